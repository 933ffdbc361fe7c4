"""``ObjectHost``: exactly one live instance per object id, created lazily.

Calls run in the caller's task (so a handler starts before the next call is
considered, as on Cloudflare) and interleave only at ``await`` points. An instance with
nothing in flight, no open WebSocket, no ``wait_until`` work and no
``_dockyard_keep_alive()`` is evicted after ``idle_timeout`` seconds and rebuilt on the
next call with its storage intact.

``start()`` first applies the class migrations given as ``migrations`` (see
``objects.migrations``): before any object file or alarm index is opened.

Over 400 lines: ObjectHost owns the cells, their creation, delivery, eviction and reset;
those share the cell table and the input gates, and a split would pass the table around.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dockyard.errors import MethodNotFound, ObjectError, ObjectReset
from dockyard.http import Request, Response

from .alarms import AlarmInfo, AlarmScheduler, AlarmSlot
from .base import DurableObject, DurableObjectState
from .cell import Cell
from .files import OpenFiles
from .ids import DurableObjectId, IdFactory
from .migrations import ClassMigrations
from .namespace import DurableObjectNamespace
from .storage import DurableObjectStorage

__all__ = ["HostStatistics", "ObjectHost"]

log = logging.getLogger("dockyard.objects")
T = TypeVar("T")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

ContextExtension = Callable[[DurableObjectState], object]


@dataclass(frozen=True, slots=True)
class HostStatistics:
    live: dict[str, int]  # live instances per class
    in_flight: int  # calls being handled (not counting those queued at a gate)
    queued: int  # calls waiting at a closed gate
    pending_alarms: int


class ObjectHost:
    """Hosts the Durable Objects of one app; stubs deliver to it."""

    stop_grace = 5.0  # seconds stop() waits for in-flight calls

    def __init__(
        self,
        state_dir: Path,
        *,
        app: str,
        idle_timeout: float = 70.0,
        open_files: OpenFiles | None = None,
        migrations: ClassMigrations | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.migrations = migrations
        self._open_files = open_files
        self.app = app
        self.idle_timeout = idle_timeout
        self._objects_dir = self.state_dir / "objects"
        self._namespaces: dict[str, DurableObjectNamespace] = {}
        self._ids: dict[str, IdFactory] = {}
        self._id_keys: dict[str, str] = {}
        self._classes: dict[str, type[DurableObject]] = {}
        self._extensions: dict[str, ContextExtension] = {}
        self._env: object = None
        self._cells: dict[tuple[str, str], Cell] = {}
        self._retired: set[Cell] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._running = False
        # Set by start(): asked once, as asyncio.get_running_loop() costs a getpid system
        # call on each use (CPython's check for a fork).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alarms = AlarmScheduler(self._objects_dir, self._deliver_alarm, self._is_bound)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._objects_dir.mkdir(parents=True, exist_ok=True)
        if self.migrations is not None:
            # Synchronous and before anything opens a file: a rename moves whole folders.
            self._id_keys = self.migrations.apply()
            for class_name, ids in self._ids.items():
                ids.rekey(self._id_keys.get(class_name))
        await self.alarms.start()
        self._loop = asyncio.get_running_loop()
        self._running = True

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        await self.alarms.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stop_grace):
                await self._drained.wait()
        cells = [*self._cells.values(), *self._retired]
        for cell in cells:
            if not cell.dead:
                cell.kill(ObjectReset(f"{cell} was reset: the host stopped"))
            self._cells.pop(cell.key, None)
        owned = [task for cell in cells for task in cell.tasks]
        await asyncio.gather(*owned, return_exceptions=True)
        for cell in cells:
            if not cell.finalized:
                cell.finalized = True
                await self._close_instance(cell)
                cell.storage.close()
        self._retired.clear()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def __aenter__(self) -> ObjectHost:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- configuration ----------------------------------------------------------------

    def namespace(self, class_name: str) -> DurableObjectNamespace:
        namespace = self._namespaces.get(class_name)
        if namespace is None:
            if not _CLASS_NAME.fullmatch(class_name):
                raise ObjectError(
                    f"Durable Object class name {class_name!r} must be a Python identifier"
                )
            ids = self._ids[class_name] = IdFactory(
                self.app, class_name, self._id_keys.get(class_name)
            )
            namespace = DurableObjectNamespace(class_name, app=self.app, delivery=self, ids=ids)
            self._namespaces[class_name] = namespace
        return namespace

    def set_env(self, env: object) -> None:
        self._env = env

    def set_class(self, class_name: str, cls: type[DurableObject]) -> None:
        """(Re)bind a class; live instances of an older class finish, then are dropped."""
        self.namespace(class_name)
        if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
            raise ObjectError(f"{cls!r} bound to {class_name!r} is not a DurableObject subclass")
        self._classes[class_name] = cls
        for cell in list(self._cells.values()):
            if cell.class_name == class_name and cell.cls is not cls:
                cell.retiring = True
                self._consider(cell)
        self.alarms.class_bound(class_name)

    def set_context_extension(self, class_name: str, factory: ContextExtension) -> None:
        """``factory(state)`` becomes ``ctx.container`` of new instances of that class."""
        self._extensions[class_name] = factory

    def live_count(self) -> int:
        return len(self._cells)

    def statistics(self) -> HostStatistics:
        live: dict[str, int] = {}
        for class_name, _ in self._cells:
            live[class_name] = live.get(class_name, 0) + 1
        queued = sum(len(cell.waiters) for cell in self._cells.values())
        return HostStatistics(live, self._in_flight, queued, self.alarms.pending())

    # -- delivery (the ObjectDelivery seam) ------------------------------------------------

    async def deliver_fetch(
        self, class_name: str, object_id: DurableObjectId, request: Request
    ) -> Response:
        async def invoke(cell: Cell, instance: DurableObject) -> Response:
            handler = getattr(instance, "fetch", None)
            if handler is None:
                raise MethodNotFound(f"{type(instance).__name__} has no fetch() handler")
            response = await handler(request)
            if not isinstance(response, Response):
                raise ObjectError(
                    f"{type(instance).__name__}.fetch() must return a Response, "
                    f"got {type(response).__name__}"
                )
            socket = response.web_socket
            hibernatable = getattr(socket, "hibernatable", False)  # see compat.hibernation
            if socket is not None and not socket.closed and not hibernatable:
                # An open WebSocket pins the object in memory until it closes (unless
                # ctx.acceptWebSocket handed it to the runtime: then the object may sleep).
                cell.own(asyncio.ensure_future(socket.wait_closed()))
            return response

        return await self._deliver(class_name, object_id, invoke)

    async def deliver_call(
        self,
        class_name: str,
        object_id: DurableObjectId,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self._check_running()
        self._check_method(class_name, method)

        async def invoke(cell: Cell, instance: DurableObject) -> Any:
            result = getattr(instance, method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return await self._deliver(class_name, object_id, invoke)

    def _check_running(self) -> None:
        if not self._running:
            raise ObjectError("the Durable Object host is not running")

    def _check_method(self, class_name: str, method: str) -> None:
        cls = self._class(class_name)
        if method.startswith("_"):
            raise MethodNotFound(
                f"{cls.__name__}.{method} is private: stubs can only call public methods"
            )
        attr = inspect.getattr_static(cls, method, None)
        if attr is None or not (callable(attr) or isinstance(attr, staticmethod | classmethod)):
            raise MethodNotFound(f"{cls.__name__} has no method {method!r}")

    async def _deliver_alarm(
        self, class_name: str, id_hex: str, name: str | None, info: AlarmInfo
    ) -> None:
        object_id = DurableObjectId(id_hex, name, class_name)

        async def invoke(cell: Cell, instance: DurableObject) -> None:
            handler = getattr(instance, "alarm", None)
            if handler is None:
                log.warning("%s has an alarm set but no alarm() handler", type(instance).__name__)
                return
            await handler(info)

        await self._deliver(class_name, object_id, invoke)

    async def _deliver(
        self,
        class_name: str,
        object_id: DurableObjectId,
        invoke: Callable[[Cell, DurableObject], Awaitable[T]],
    ) -> T:
        self._check_running()
        task = asyncio.current_task(self._loop)
        assert task is not None
        key = (class_name, object_id.hex)
        while True:
            cell = self._cells.get(key) or self._build(class_name, object_id)
            if not cell.retiring:
                break
            await cell.dropped.wait()
        if not cell.enter_now(task):
            await cell.enter(task)
        try:
            assert cell.instance is not None
            return await invoke(cell, cell.instance)
        except asyncio.CancelledError:
            if task in cell.reset_cancelled:
                cell.reset_cancelled.discard(task)
                task.uncancel()
                raise ObjectReset(str(cell.reset_error)) from None
            raise
        finally:
            cell.exit(task)

    # -- instances --------------------------------------------------------------------

    def _is_bound(self, class_name: str) -> bool:
        return class_name in self._classes

    def _class(self, class_name: str) -> type[DurableObject]:
        cls = self._classes.get(class_name)
        if cls is None:
            raise ObjectError(
                f"no class is bound to Durable Object namespace {class_name!r} "
                f"(is it exported by the worker module?)"
            )
        return cls

    def _build(self, class_name: str, object_id: DurableObjectId) -> Cell:
        cls = self._class(class_name)
        path = self._objects_dir / class_name / f"{object_id.hex}.sqlite"
        alarm = AlarmSlot(self.alarms, class_name, object_id.hex, object_id.name)
        holder: list[Cell] = []
        storage = DurableObjectStorage(
            path, alarm, hold=lambda: self._hold(holder[0]), open_files=self._open_files
        )
        cell = Cell(self, class_name, cls, object_id, storage)
        holder.append(cell)
        factory = self._extensions.get(class_name)
        try:
            if factory is not None:
                cell.state.container = factory(cell.state)
            cell.instance = cls(cell.state, self._env)
        except Exception as error:
            cell.kill(ObjectReset(f"{cell} was reset: its constructor raised {error!r}"))
            storage.close()
            raise ObjectReset(f"{cls.__name__} constructor raised {error!r}") from error
        self._cells[cell.key] = cell
        return cell

    @contextlib.asynccontextmanager
    async def _hold(self, cell: Cell) -> AsyncIterator[None]:
        """Close the gate of ``cell`` without block_concurrency_while's reset-on-error."""
        cell.blockers += 1
        try:
            yield
        finally:
            cell.blockers -= 1
            cell.release_next()

    # The idle timer is lazy: a call does not cancel it, its end moves ``idle_since``, and
    # the timer, when it fires early or during a call, arms itself again as needed. One
    # timer per idle period, not a cancel and a new one per call.

    def _call_started(self, cell: Cell) -> None:
        self._in_flight += 1
        self._drained.clear()

    def _call_finished(self, cell: Cell) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._drained.set()
        if self._loop is not None:
            cell.idle_since = self._loop.time()
        self._consider(cell)

    def _consider(self, cell: Cell) -> None:
        """Re-check a cell after anything that may have made it idle."""
        if cell.dead:
            self._finalize(cell)
            return
        if cell.retiring and not (cell.active or cell.waiters or cell.blockers):
            self._drop(cell)
            return
        if cell.busy or not self._running:
            return
        if cell.idle_handle is None:
            loop = self._loop
            assert loop is not None  # (running)
            cell.idle_since = loop.time()
            cell.idle_handle = loop.call_at(
                cell.idle_since + self.idle_timeout, self._idle_expired, cell
            )

    def _idle_expired(self, cell: Cell) -> None:
        cell.idle_handle = None
        if cell.dead or cell.busy:
            return  # the end of what keeps it busy considers it again
        loop = self._loop
        assert loop is not None
        due = cell.idle_since + self.idle_timeout
        if loop.time() < due:  # a call came and went since the timer was armed
            cell.idle_handle = loop.call_at(due, self._idle_expired, cell)
            return
        assert cell.instance is not None
        if cell.instance._dockyard_keep_alive():
            self._consider(cell)
            return
        self._drop(cell)

    def _drop(self, cell: Cell) -> None:
        """Take a cell out of service; its leftover owned tasks may still finish."""
        cell.dead = True
        cell.dropped.set()
        if cell.idle_handle is not None:
            cell.idle_handle.cancel()
            cell.idle_handle = None
        if self._cells.get(cell.key) is cell:
            del self._cells[cell.key]
        self._retired.add(cell)
        self._finalize(cell)

    def _reset(
        self, cell: Cell, error: ObjectReset, spare: asyncio.Task[Any] | None = None
    ) -> None:
        if cell.dead:
            return
        log.warning("%s", error)
        cell.kill(error, spare)
        if self._cells.get(cell.key) is cell:
            del self._cells[cell.key]
        self._retired.add(cell)
        self._finalize(cell)

    def _finalize(self, cell: Cell) -> None:
        if cell.finalized or cell.active or cell.tasks:
            return
        cell.finalized = True
        self._retired.discard(cell)
        cell.storage.close()
        instance = cell.instance
        if instance is not None and type(instance)._dockyard_close is not (
            DurableObject._dockyard_close
        ):
            task = asyncio.get_running_loop().create_task(self._close_instance(cell))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _close_instance(self, cell: Cell) -> None:
        if cell.instance is None:
            return
        try:
            await cell.instance._dockyard_close()
        except Exception:
            log.exception("%s: _dockyard_close() failed", cell)

    def _log_background(self, cell: Cell, error: BaseException | None) -> None:
        log.error("%s: background work (wait_until) failed: %r", cell, error)
