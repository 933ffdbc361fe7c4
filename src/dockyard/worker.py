"""Loading and running the user's worker module.

A worker is a Python file (``main`` in the wrangler config) that defines either a
module-level ``async def fetch(request, env, ctx)`` or, as in Cloudflare's Python
Workers, ``class Default(WorkerEntrypoint)`` with an ``async def fetch(self, request)``
(and optionally ``scheduled(self, controller, env, ctx)`` for cron triggers). Cloudflare's
runtime modules (``workers``, ``asgi``, ``js``, ``pyodide.ffi``) are importable by it:
see ``dockyard.compat``.
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
from typing import Any, cast

from .compat import MODULES_DIR, set_current_env
from .compat.deps import WorkerEnvironment
from .compat.types import as_cloudflare_request
from .errors import WorkerError
from .http import Request, Response
from .objects.namespace import DurableObjectNamespace

__all__ = ["Env", "ExecutionContext", "Worker", "WorkerEntrypoint", "load_worker"]

log = logging.getLogger("dockyard.worker")

FetchHandler = Callable[[Any, "Env", "ExecutionContext"], Awaitable[Any]]


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
        for name, binding in (bindings or {}).items():
            # Calls through env are Cloudflare's RPC: arguments and results are copies.
            if isinstance(binding, DurableObjectNamespace) and not binding.copies_rpc:
                binding = binding.with_rpc_copies()
            values[name] = binding
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

    # Cloudflare's spellings.
    waitUntil = wait_until
    passThroughOnException = pass_through_on_exception

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
    """A loaded worker module and its handlers (``fetch``, and ``scheduled`` if defined)."""

    def __init__(self, module: ModuleType, path: Path) -> None:
        self.module = module
        self.path = path
        handler = _find_handler(module, path, "fetch")
        assert handler is not None  # required=True raises instead
        self._handler = handler
        self._scheduled = _find_handler(module, path, "scheduled", required=False)

    def get_class(self, name: str) -> type | None:
        value = getattr(self.module, name, None)
        return value if isinstance(value, type) else None

    @property
    def has_scheduled(self) -> bool:
        return self._scheduled is not None

    async def fetch(self, request: Request, env: Env, ctx: ExecutionContext) -> Response:
        set_current_env(env)
        result = await self._handler(as_cloudflare_request(request), env, ctx)
        if not isinstance(result, Response):
            raise WorkerError(
                f"{self.path.name}: fetch returned {type(result).__name__}, expected a Response"
            )
        return result

    async def scheduled(self, controller: Any, env: Env, ctx: ExecutionContext) -> None:
        """Run the ``scheduled`` handler (cron triggers) with a ``ScheduledController``."""
        if self._scheduled is None:
            raise WorkerError(f"{self.path.name}: no scheduled handler is defined")
        set_current_env(env)
        await self._scheduled(controller, env, ctx)


def _positional_count(function: Callable[..., Any], bound: bool) -> int:
    """How many of (event, env, ctx) ``function`` takes; a ``*args`` takes all three."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return 3
    if bound and parameters:
        parameters = parameters[1:]  # self
    count = 0
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return 3
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            count += 1
    return min(count, 3)


async def _settle(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _call_with_prefix(function: Callable[..., Any], taken: int) -> FetchHandler:
    if taken == 3 and inspect.iscoroutinefunction(function):
        # The usual ``async def fetch(request, env, ctx)``: called as it is, without two
        # more coroutines per request around it.
        return cast(FetchHandler, function)

    async def call_function(event: Any, env: Env, ctx: ExecutionContext) -> Any:
        return await _settle(function(*(event, env, ctx)[:taken]))

    return call_function


def _find_handler(
    module: ModuleType, path: Path, kind: str, *, required: bool = True
) -> FetchHandler | None:
    """The handler for ``kind`` ("fetch" or "scheduled"), called as (event, env, ctx).

    Looked for, in order: ``class Default(WorkerEntrypoint)`` with a ``kind`` method
    taking (event, env, ctx) or a prefix of them (``fetch(self)``, ``fetch(self, request)``,
    ``scheduled(self, controller, env, ctx)``); then a module-level ``kind`` or Cloudflare's
    older ``on_<kind>``, async or not, taking a prefix of (event, env, ctx).
    """
    default = getattr(module, "Default", None)
    if isinstance(default, type) and issubclass(default, WorkerEntrypoint):
        entrypoint: type[WorkerEntrypoint] = default
        method = getattr(entrypoint, kind, None)
        if method is not None and not (
            kind == "fetch" and method is WorkerEntrypoint.fetch and hasattr(module, "on_fetch")
        ):
            taken = _positional_count(method, bound=True)

            async def call_entrypoint(event: Any, env: Env, ctx: ExecutionContext) -> Any:
                instance = entrypoint(ctx, env)
                return await _settle(getattr(instance, kind)(*(event, env, ctx)[:taken]))

            return call_entrypoint
    for name in (kind, f"on_{kind}"):
        function = getattr(module, name, None)
        if function is None or isinstance(function, type):
            continue
        if not callable(function):
            if not required:
                continue  # e.g. a module variable that happens to be called `scheduled`
            raise WorkerError(f"{path}: {name} must be a function, got {type(function).__name__}")
        if kind == "fetch" and name == "fetch" and not inspect.iscoroutinefunction(function):
            raise WorkerError(
                f"{path}: fetch must be defined with `async def fetch(request, env, ctx)`"
            )
        return _call_with_prefix(function, _positional_count(function, bound=False))
    if not required:
        return None
    raise WorkerError(
        f"{path}: no handler found; define `async def fetch(request, env, ctx)` "
        "or `class Default(WorkerEntrypoint)` with an async fetch(self, request)"
    )


_generation = 0


def load_worker(path: Path, project_dir: Path, state_dir: Path | None = None) -> Worker:
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
    # Cloudflare's runtime modules (workers, asgi, js, pyodide.ffi) come right after the
    # worker's own folder: a project module of the same name wins, site-packages loses.
    modules = str(MODULES_DIR)
    if modules in sys.path:
        sys.path.remove(modules)
    sys.path.insert(sys.path.index(folder) + 1, modules)
    # Then the project's own dependencies (pyproject.toml), installed with uv if changed.
    packages = WorkerEnvironment(project, state_dir or project / ".dockyard").ensure()
    if packages is not None and str(packages) not in sys.path:
        sys.path.insert(sys.path.index(modules) + 1, str(packages))
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
