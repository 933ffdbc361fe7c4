"""Loading and running the user's worker module.

A worker is a Python file (``main`` in the wrangler config) that defines either a
module-level ``async def fetch(request, env, ctx)`` or, as in Cloudflare's Python
Workers, ``class Default(WorkerEntrypoint)`` with an ``async def fetch(self, request)``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import WorkerError
from .http import Request, Response

__all__ = ["Env", "ExecutionContext", "Worker", "WorkerEntrypoint", "load_worker"]

log = logging.getLogger("dockyard.worker")

FetchHandler = Callable[[Request, "Env", "ExecutionContext"], Awaitable[Response]]


class Env:
    """What the worker sees as ``env``: bindings, ``vars`` and secrets as attributes."""

    def __init__(
        self,
        bindings: Mapping[str, Any] | None = None,
        vars: Mapping[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        self._secret_names = frozenset(secrets or ())
        values: dict[str, Any] = {}
        values.update(vars or {})
        values.update(secrets or {})
        values.update(bindings or {})
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        # Only reached when the attribute is missing: say what exists instead of a bare
        # AttributeError, since a typo in a binding name is the usual cause.
        if name.startswith("__"):
            raise AttributeError(name)
        known = ", ".join(sorted(k for k in self.__dict__ if not k.startswith("_"))) or "none"
        raise AttributeError(
            f"env has no binding, var or secret named {name!r} (known: {known}); "
            "check durable_objects.bindings, vars and .dev.vars"
        )

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not name.startswith("_") and name in self.__dict__

    def __repr__(self) -> str:
        shown = {
            k: ("<secret>" if k in self._secret_names else v)
            for k, v in self.__dict__.items()
            if not k.startswith("_")
        }
        return f"Env({shown!r})"


class ExecutionContext:
    """``ctx`` for a worker invocation: ``wait_until`` keeps work alive after the response."""

    def __init__(self, tasks: set[asyncio.Task[Any]]) -> None:
        self._tasks = tasks

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def pass_through_on_exception(self) -> None:
        """Accepted for compatibility; there is no origin to fall through to."""

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ctx.wait_until task failed", exc_info=task.exception())


class WorkerEntrypoint:
    """Base class for ``class Default(WorkerEntrypoint)`` workers."""

    def __init__(self, ctx: ExecutionContext, env: Env) -> None:
        self.ctx = ctx
        self.env = env

    async def fetch(self, request: Request) -> Response:
        return Response("Not Found", status=404)


class Worker:
    """A loaded worker module and its request handler."""

    def __init__(self, module: ModuleType, path: Path) -> None:
        self.module = module
        self.path = path
        self._handler = _find_handler(module, path)

    def get_class(self, name: str) -> type | None:
        value = getattr(self.module, name, None)
        return value if isinstance(value, type) else None

    async def fetch(self, request: Request, env: Env, ctx: ExecutionContext) -> Response:
        result = await self._handler(request, env, ctx)
        if not isinstance(result, Response):
            raise WorkerError(
                f"{self.path.name}: fetch returned {type(result).__name__}, expected a Response"
            )
        return result


def _find_handler(module: ModuleType, path: Path) -> FetchHandler:
    default = getattr(module, "Default", None)
    if isinstance(default, type) and issubclass(default, WorkerEntrypoint):
        entrypoint: type[WorkerEntrypoint] = default

        async def call_entrypoint(request: Request, env: Env, ctx: ExecutionContext) -> Response:
            return await entrypoint(ctx, env).fetch(request)

        return call_entrypoint
    fetch = getattr(module, "fetch", None)
    if fetch is not None:
        if not inspect.iscoroutinefunction(fetch):
            raise WorkerError(
                f"{path}: fetch must be defined with `async def fetch(request, env, ctx)`"
            )
        handler: FetchHandler = fetch
        return handler
    raise WorkerError(
        f"{path}: no handler found; define `async def fetch(request, env, ctx)` "
        "or `class Default(WorkerEntrypoint)` with an async fetch(self, request)"
    )


_generation = 0


def load_worker(path: Path, project_dir: Path) -> Worker:
    """Import (or re-import) the worker module at ``path``.

    Modules the worker imported from its own project folder are dropped from
    ``sys.modules`` first, so a reload picks up edits to them as well.
    """
    global _generation
    _generation += 1
    project = project_dir.resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(project) and "site-packages" not in file:
            del sys.modules[name]
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"dockyard_worker_{_generation}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkerError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise WorkerError(
            f"{path}: importing the worker failed: {type(exc).__name__}: {exc}"
        ) from exc
    return Worker(module, path)
