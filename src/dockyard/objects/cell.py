"""One live instance and everything that keeps it: calls, the gate, owned tasks.

The gate: a call is delivered at once when nothing holds the object, otherwise it queues.
``block_concurrency_while`` closes the gate until its task ends. Queued calls are released
one at a time, and the next only after the released one ran to its first suspension, so
a call that blocks concurrency first thing is never overtaken (Cloudflare delivers
events the same way).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from dockyard.errors import ObjectReset

from .base import DurableObject, DurableObjectState
from .ids import DurableObjectId
from .storage import DurableObjectStorage

if TYPE_CHECKING:
    from .host import ObjectHost

__all__ = ["Cell"]

T = TypeVar("T")


class Cell:
    def __init__(
        self,
        host: ObjectHost,
        class_name: str,
        cls: type[DurableObject],
        object_id: DurableObjectId,
        storage: DurableObjectStorage,
    ) -> None:
        self.host = host
        self.class_name = class_name
        self.cls = cls
        self.key = (class_name, object_id.hex)
        self.id = object_id
        self.storage = storage
        self.state = DurableObjectState(object_id, storage, self)
        self.instance: DurableObject | None = None
        self.active: dict[asyncio.Task[Any], int] = {}
        self.reset_cancelled: set[asyncio.Task[Any]] = set()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.blockers = 0
        self.tasks: set[asyncio.Future[Any]] = set()
        self.dead = False
        self.retiring = False
        self.finalized = False
        self.reset_error: ObjectReset | None = None
        self.dropped = asyncio.Event()
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # (loop time) when the last call ended; see ObjectHost

    def __repr__(self) -> str:
        return f"<{self.class_name} {self.id.name or self.id.hex[:12]}>"

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiters or self.blockers or self.tasks)

    # -- the gate ---------------------------------------------------------------------

    def enter_now(self, task: asyncio.Task[Any]) -> bool:
        """Enter at once when nothing holds the gate (the usual case); False: await enter()."""
        if self.dead or self.blockers or self.waiters:
            return False
        self.active[task] = self.active.get(task, 0) + 1
        self.host._call_started(self)
        return True

    async def enter(self, task: asyncio.Task[Any]) -> None:
        if self.dead:
            raise ObjectReset(str(self.reset_error or f"{self} was reset"))
        if self.blockers or self.waiters:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release_soon()  # we were released but will not run: pass it on
                raise
            self._release_soon()
        self.active[task] = self.active.get(task, 0) + 1
        self.host._call_started(self)

    def exit(self, task: asyncio.Task[Any]) -> None:
        count = self.active[task] - 1
        if count:
            self.active[task] = count
        else:
            del self.active[task]
        self.host._call_finished(self)

    def _release_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self.release_next)

    def release_next(self) -> None:
        while self.waiters and not self.blockers:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- what ctx offers (the _Runtime protocol of base.py) --------------------------------

    def block_concurrency_while(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        if self.dead:
            coro.close()
            raise ObjectReset(str(self.reset_error or f"{self} was reset"))
        task = asyncio.get_running_loop().create_task(coro)
        self.blockers += 1
        self.tasks.add(task)
        task.add_done_callback(self._block_done)
        return task

    def _block_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.blockers -= 1
        error = None if task.cancelled() else task.exception()
        if error is not None and not self.dead:
            reset = ObjectReset(f"{self} was reset: block_concurrency_while() raised {error!r}")
            reset.__cause__ = error
            self.host._reset(self, reset)
            return
        self.release_next()
        self.host._consider(self)

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        self.own(asyncio.ensure_future(awaitable))

    def own(self, future: asyncio.Future[Any]) -> None:
        self.tasks.add(future)
        future.add_done_callback(self._owned_done)

    def _owned_done(self, future: asyncio.Future[Any]) -> None:
        self.tasks.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self.host._log_background(self, future.exception())
        self.host._consider(self)

    def abort(self, reason: str) -> NoReturn:
        error = ObjectReset(f"{self} was aborted: {reason}" if reason else f"{self} was aborted")
        self.host._reset(self, error, spare=asyncio.current_task())
        raise error

    # -- reset ------------------------------------------------------------------------

    def kill(self, error: ObjectReset, spare: asyncio.Task[Any] | None = None) -> None:
        """Fail waiting calls, cancel in-flight ones (except ``spare``) and owned tasks."""
        self.dead = True
        self.reset_error = error
        self.dropped.set()
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ObjectReset(str(error)))
        for task in self.active:
            if task is not spare:
                self.reset_cancelled.add(task)
                task.cancel()
        for owned in list(self.tasks):
            owned.cancel()
