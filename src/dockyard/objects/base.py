"""The ``DurableObject`` base class and the ``ctx`` each instance receives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

if TYPE_CHECKING:
    from .ids import DurableObjectId
    from .storage import DurableObjectStorage

__all__ = ["DurableObject", "DurableObjectState"]

T = TypeVar("T")


class _Runtime(Protocol):
    """What the host gives a state: gate, owned tasks, reset."""

    def block_concurrency_while(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]: ...

    def wait_until(self, awaitable: Awaitable[Any]) -> None: ...

    def abort(self, reason: str) -> NoReturn: ...


class DurableObjectState:
    """``ctx``: the object's id, storage, optional container slot and concurrency controls."""

    def __init__(
        self, id: DurableObjectId, storage: DurableObjectStorage, runtime: _Runtime
    ) -> None:
        self.id = id
        self.storage = storage
        self.container: object | None = None
        self._runtime = runtime

    def block_concurrency_while(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` with every other delivery to this object held until it finishes.

        Callable without ``await`` (e.g. from the constructor): the coroutine starts as a
        task at once. Awaiting the returned task gives its result. If it raises, the
        object is reset.
        """
        return self._runtime.block_concurrency_while(coro)

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Keep the object in memory until ``awaitable`` finishes (runs in the background)."""
        self._runtime.wait_until(awaitable)

    def abort(self, reason: str = "") -> NoReturn:
        """Reset the object now: in-flight and waiting calls get ObjectReset."""
        self._runtime.abort(reason)


class DurableObject:
    """Base class for Durable Objects.

    Subclasses may define ``async def fetch(self, request)``, ``async def alarm(self,
    info)`` and any public method, which stubs call by RPC.
    """

    def __init__(self, ctx: DurableObjectState, env: Any) -> None:
        self.ctx = ctx
        self.env = env

    def _dockyard_keep_alive(self) -> bool:
        """True keeps an idle instance in memory (the Container class, while it runs)."""
        return False

    async def _dockyard_close(self) -> None:
        """Called once when the host drops this instance (stop, eviction, reset, reload)."""
