"""The ``workers`` module of Cloudflare's Python Workers, on Dockyard's own types.

``Request`` and ``Response`` are Dockyard's (``dockyard.http``) with Cloudflare's
constructor signatures and defaults on top; ``WorkerEntrypoint`` and ``DurableObject``
are Dockyard's base classes, so the worker loader and the object host accept them
unchanged. Where Cloudflare hands Python a JavaScript object (``request.js_object``),
Dockyard hands back the Python object itself: every API here accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from http import HTTPMethod
from typing import Any

import aiohttp

from dockyard.http import Headers, make_headers
from dockyard.http import Request as _Request
from dockyard.objects import DurableObject as _DurableObject
from dockyard.objects import DurableObjectNamespace, DurableObjectState
from dockyard.worker import ExecutionContext
from dockyard.worker import WorkerEntrypoint as _WorkerEntrypoint

from . import asgi, current_env, wsgi
from .clone import clone
from .forms import Blob, File, FormData
from .hibernation import HIBERNATION, WebSocketRequestResponsePair
from .types import TEXT_CONTENT_TYPE, FetchResponse, Request, Response

__all__ = [
    "Blob",
    "Context",
    "DurableObject",
    "FetchResponse",
    "File",
    "FormData",
    "Headers",
    "Request",
    "Response",
    "WorkerEntrypoint",
    "WorkflowEntrypoint",
    "asgi",
    "fetch",
    "handler",
    "import_from_javascript",
    "patch_env",
    "python_from_rpc",
    "python_to_rpc",
    "wsgi",
]

# Cloudflare resets an object whose blockConcurrencyWhile callback runs longer than this.
BLOCK_CONCURRENCY_LIMIT = 30.0

Context = ExecutionContext


# -- outbound fetch ----------------------------------------------------------------------


async def fetch(resource: str | _Request, **options: Any) -> Response:
    """``await fetch(url, method=..., headers=..., body=...)``: an outbound HTTP request.

    The response body is read whole before this returns (Cloudflare streams it).
    """
    if isinstance(resource, _Request):
        method = options.get("method") or resource.method
        headers = make_headers(options.get("headers", resource.headers))
        body: Any = options.get("body")
        if body is None and resource.has_body:
            body = await resource.bytes()
        url = resource.url
    else:
        method = options.get("method") or "GET"
        headers = make_headers(options.get("headers"))
        body = options.get("body")
        url = str(resource)
    if isinstance(method, HTTPMethod):
        method = method.value
    if isinstance(body, str):
        headers.setdefault("content-type", TEXT_CONTENT_TYPE)
        body = body.encode()
    follow = options.get("redirect", "follow") == "follow"
    async with (
        aiohttp.ClientSession(auto_decompress=True) as session,
        session.request(
            str(method).upper(), url, headers=headers, data=body, allow_redirects=follow
        ) as answer,
    ):
        payload = await answer.read()
        kept = [(k, v) for k, v in answer.headers.items() if k.lower() != "content-encoding"]
        return Response(payload, answer.status, answer.reason or "", kept)


# -- entrypoints -------------------------------------------------------------------------


def handler(func: Callable[..., Any]) -> Callable[..., Any]:
    """Cloudflare converts JavaScript arguments to Python here; Dockyard's already are."""
    return func


class WorkerEntrypoint(_WorkerEntrypoint):
    """``class Default(WorkerEntrypoint)`` with ``fetch`` and ``scheduled`` methods."""


class WorkflowEntrypoint:
    """Importable so modules that define workflows load; Dockyard does not run them."""

    def __init__(self, ctx: Any, env: Any) -> None:
        self.ctx = ctx
        self.env = env


class CloudflareState:
    """A Durable Object's ``ctx`` with Cloudflare's camelCase names beside Dockyard's."""

    def __init__(self, state: DurableObjectState, owner: type, env: Any = None) -> None:
        self._state = state
        self._owner = owner
        self._env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def __repr__(self) -> str:
        return f"<ctx of {self._owner.__name__} {self._state.id!r}>"

    @property
    def id(self) -> Any:
        return self._state.id

    @property
    def storage(self) -> Any:
        return self._state.storage

    def wait_until(self, awaitable: Any) -> None:
        self._state.wait_until(awaitable)

    waitUntil = wait_until

    def block_concurrency_while(self, callback: Any) -> asyncio.Task[Any]:
        """Hold every other delivery while ``callback`` runs (at most 30 s, then reset).

        ``callback`` is a function, a coroutine function or (Dockyard's form) a
        coroutine. The returned task may be awaited or left alone.
        """
        limit = getattr(self._owner, "block_concurrency_limit", BLOCK_CONCURRENCY_LIMIT)

        async def run() -> Any:
            async with asyncio.timeout(limit):
                result = callback() if callable(callback) else callback
                if inspect.isawaitable(result):
                    result = await result
                return result

        return self._state.block_concurrency_while(run())

    blockConcurrencyWhile = block_concurrency_while

    # -- WebSocket hibernation (dockyard.compat.hibernation) ---------------------------

    def _namespace(self) -> Any:
        class_name = self._state.id.namespace
        for value in vars(self._env).values() if self._env is not None else ():
            if isinstance(value, DurableObjectNamespace) and value.class_name == class_name:
                return value
        raise RuntimeError(
            f"acceptWebSocket() needs a durable_objects binding for class {class_name!r}"
        )

    def accept_web_socket(self, ws: Any, tags: list[str] | None = None) -> None:
        HIBERNATION.accept(ws, list(tags or ()), self._namespace(), self._state.id)

    def get_web_sockets(self, tag: str | None = None) -> list[Any]:
        return HIBERNATION.sockets(self._state.id.namespace, self._state.id.hex, tag)

    def get_tags(self, ws: Any) -> list[str]:
        return list(getattr(ws, "tags", ()))

    def set_web_socket_auto_response(
        self, pair: WebSocketRequestResponsePair | None = None
    ) -> None:
        HIBERNATION.set_auto_response(self._state.id.namespace, self._state.id.hex, pair)

    def get_web_socket_auto_response(self) -> WebSocketRequestResponsePair | None:
        return HIBERNATION.auto_response(self._state.id.namespace, self._state.id.hex)

    def get_web_socket_auto_response_timestamp(self, ws: Any) -> float | None:
        return getattr(ws, "auto_response_at", None)

    def set_hibernatable_web_socket_event_timeout(self, timeout_ms: float | None = None) -> None:
        """Accepted; events are not timed out."""

    acceptWebSocket = accept_web_socket
    getWebSockets = get_web_sockets
    getTags = get_tags
    setWebSocketAutoResponse = set_web_socket_auto_response
    getWebSocketAutoResponse = get_web_socket_auto_response
    getWebSocketAutoResponseTimestamp = get_web_socket_auto_response_timestamp
    setHibernatableWebSocketEventTimeout = set_hibernatable_web_socket_event_timeout


class _GivesCloudflareState(type):
    """Hands the constructor Cloudflare's ``ctx``: user code calls ``ctx.waitUntil`` on
    the argument itself, before (or without) ``super().__init__``."""

    def __call__(cls, ctx: Any, env: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(ctx, DurableObjectState):
            ctx = CloudflareState(ctx, cls, env)
        return super().__call__(ctx, env, *args, **kwargs)


class DurableObject(_DurableObject, metaclass=_GivesCloudflareState):
    """Cloudflare's ``DurableObject`` base class.

    ``ctx`` offers ``waitUntil`` and ``blockConcurrencyWhile`` beside the snake_case
    names; ``async def fetch(self)`` (no request) is accepted as on Cloudflare.
    ``block_concurrency_limit`` (30 s, Cloudflare's) may be lowered by a subclass.
    """

    block_concurrency_limit: float = BLOCK_CONCURRENCY_LIMIT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("fetch")
        if own is not None and takes_no_arguments(own):

            async def fetch(self: Any, request: _Request) -> Any:
                return await own(self)

            fetch.__wrapped__ = own  # type: ignore[attr-defined]
            cls.fetch = fetch  # type: ignore[attr-defined]


def takes_no_arguments(method: Callable[..., Any]) -> bool:
    """Whether ``method(self)`` is all it accepts (``async def fetch(self)``)."""
    try:
        parameters = list(inspect.signature(method).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return not parameters


# -- helpers Cloudflare exports ----------------------------------------------------------


class _CloudflareWorkersModule:
    """What ``import_from_javascript("cloudflare:workers")`` returns."""

    WorkerEntrypoint = WorkerEntrypoint
    DurableObject = DurableObject
    WorkflowEntrypoint = WorkflowEntrypoint

    @property
    def env(self) -> Any:
        return current_env()


def import_from_javascript(module_name: str) -> Any:
    """Only ``cloudflare:workers`` (for ``env``) exists without a JavaScript runtime."""
    if module_name == "cloudflare:workers":
        return _CloudflareWorkersModule()
    raise ImportError(
        f"Failed to import {module_name!r}: Dockyard runs Python without a JavaScript "
        "runtime; only 'cloudflare:workers' can be imported"
    )


@contextlib.contextmanager
def patch_env(
    d: Mapping[str, Any] | list[tuple[str, Any]] | None = None, **values: Any
) -> Iterator[None]:
    """Override attributes of the worker's ``env`` inside the ``with`` block."""
    env = current_env()
    if env is None:
        raise RuntimeError("patch_env() needs a running worker (no env yet)")
    changes = {**dict(d or {}), **values}
    missing = object()
    saved = {name: env.__dict__.get(name, missing) for name in changes}
    env.__dict__.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                env.__dict__.pop(name, None)
            else:
                env.__dict__[name] = value


def python_to_rpc(value: Any) -> Any:
    """The copy RPC would send (Dockyard's stubs make it themselves)."""
    return clone(value, "the value")


def python_from_rpc(value: Any) -> Any:
    """Values arrive from RPC as Python already."""
    return value
