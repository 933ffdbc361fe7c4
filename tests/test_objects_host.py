from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from dockyard.errors import InvalidObjectId, MethodNotFound, ObjectError, ObjectReset
from dockyard.http import Request, Response, WebSocketPair
from dockyard.objects import DurableObject, DurableObjectState, ObjectHost
from tests.support.objects_helpers import wait_for


class Counter(DurableObject):
    builds = 0

    def __init__(self, ctx: DurableObjectState, env: Any) -> None:
        super().__init__(ctx, env)
        type(self).builds += 1

    async def increment(self) -> int:
        value = await self.ctx.storage.get("n") or 0
        await self.ctx.storage.put("n", value + 1)
        return value + 1

    async def increment_yielding(self) -> None:
        value = await self.ctx.storage.get("n") or 0
        await asyncio.sleep(0)
        await self.ctx.storage.put("n", value + 1)

    async def increment_blocked(self) -> None:
        await self.ctx.block_concurrency_while(self.increment_yielding())

    async def value(self) -> int:
        return await self.ctx.storage.get("n") or 0

    def sync_method(self, a: int, *, b: int) -> int:
        return a + b

    async def whoami(self) -> tuple[str, str | None, Any]:
        return self.ctx.id.hex, self.ctx.id.name, self.env

    async def fetch(self, request: Request) -> Response:
        return Response(f"{request.method} {request.path} {await request.text()}")

    async def fail(self) -> None:
        raise ValueError("handler error")

    @property
    def prop(self) -> int:
        return 1

    async def _secret(self) -> None:
        pass


@pytest.fixture
async def host(tmp_path: Path) -> Any:
    Counter.builds = 0
    async with ObjectHost(tmp_path, app="t", idle_timeout=0.2) as host:
        host.set_class("Counter", Counter)
        host.set_env({"env": 1})
        yield host


async def test_ids(host: ObjectHost) -> None:
    ns = host.namespace("Counter")
    assert host.namespace("Counter") is ns
    a = ns.id_from_name("a")
    assert a == ns.id_from_name("a") and a.name == "a" and len(str(a)) == 64
    assert a != ns.id_from_name("b")
    unique = ns.new_unique_id()
    assert unique.name is None and unique != ns.new_unique_id()
    assert ns.id_from_string(str(unique)) == unique
    assert ns.id_from_string(str(a).upper()) == a
    # stable across hosts (restarts): the same app and class give the same id
    other = ObjectHost(host.state_dir, app="t").namespace("Counter")
    assert str(other.id_from_name("a")) == str(a)
    assert str(ObjectHost(host.state_dir, app="u").namespace("Counter").id_from_name("a")) != (
        str(a)
    )
    for bad in ["", "xyz", "0" * 63, "g" * 64, 123]:
        with pytest.raises(InvalidObjectId, match="invalid Durable Object id"):
            ns.id_from_string(bad)  # type: ignore[arg-type]
    foreign = host.namespace("Other").id_from_name("a")
    with pytest.raises(InvalidObjectId, match="was not made by namespace 'Counter'"):
        ns.id_from_string(str(foreign))
    with pytest.raises(InvalidObjectId, match="belongs to namespace 'Other'"):
        ns.get(foreign)
    with pytest.raises(InvalidObjectId, match="takes a DurableObjectId"):
        ns.get(str(a))  # type: ignore[arg-type]
    with pytest.raises(ObjectError, match="identifier"):
        host.namespace("../x")


async def test_rpc_fetch_and_errors(host: ObjectHost) -> None:
    ns = host.namespace("Counter")
    stub = ns.get_by_name("x")
    assert stub.name == "x"
    assert await stub.increment() == 1
    assert await ns.get(ns.id_from_string(str(stub.id))).increment() == 2
    assert await stub.sync_method(1, b=2) == 3
    assert await stub.whoami() == (stub.id.hex, "x", {"env": 1})
    response = await stub.fetch("http://do/path", method="POST", body="hi")
    assert await response.text() == "POST /path hi"
    response = await stub.fetch(Request("http://do/r"))
    assert await response.text() == "GET /r "
    with pytest.raises(ValueError, match="handler error"):
        await stub.fail()
    for name in ["_secret", "nope", "prop", "ctx", "env"]:
        with pytest.raises(MethodNotFound, match=rf"Counter.*{name}"):
            await getattr(stub, name)()
    with pytest.raises(AttributeError):
        stub.__deepcopy__  # noqa: B018
    assert Counter.builds == 1
    with pytest.raises(ObjectError, match="no class is bound"):
        await host.namespace("Unbound").get_by_name("x").anything()


class NoFetch(DurableObject):
    async def bad_fetch(self) -> None:
        pass


class WrongFetch(DurableObject):
    async def fetch(self, request: Request) -> str:
        return "not a response"


async def test_fetch_errors(host: ObjectHost) -> None:
    host.set_class("NoFetch", NoFetch)
    host.set_class("WrongFetch", WrongFetch)
    with pytest.raises(MethodNotFound, match="NoFetch has no fetch"):
        await host.namespace("NoFetch").get_by_name("a").fetch("http://x/")
    with pytest.raises(ObjectError, match="must return a Response, got str"):
        await host.namespace("WrongFetch").get_by_name("a").fetch("http://x/")


async def test_thousand_concurrent_increments(host: ObjectHost) -> None:
    stub = host.namespace("Counter").get_by_name("c")
    started = time.perf_counter()
    await asyncio.gather(*(stub.increment() for _ in range(1000)))
    elapsed = time.perf_counter() - started
    print(f"\n1,000 concurrent RPC increments: {elapsed * 1000:.0f} ms")
    assert await stub.value() == 1000


async def test_block_concurrency_while_serializes_across_awaits(host: ObjectHost) -> None:
    ns = host.namespace("Counter")
    unblocked = ns.get_by_name("unblocked")
    await asyncio.gather(*(unblocked.increment_yielding() for _ in range(1000)))
    # proves the test can fail: without the gate, the read-await-write interleaves
    assert await unblocked.value() < 1000
    blocked = ns.get_by_name("blocked")
    started = time.perf_counter()
    await asyncio.gather(*(blocked.increment_blocked() for _ in range(1000)))
    print(f"\n1,000 blocked increments: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert await blocked.value() == 1000


class SlowStart(DurableObject):
    def __init__(self, ctx: DurableObjectState, env: Any) -> None:
        super().__init__(ctx, env)
        self.ready = False
        ctx.block_concurrency_while(self._load())

    async def _load(self) -> None:
        await asyncio.sleep(0.05)
        self.ready = True

    async def is_ready(self) -> bool:
        return self.ready


class BrokenStart(DurableObject):
    fail = True

    def __init__(self, ctx: DurableObjectState, env: Any) -> None:
        super().__init__(ctx, env)
        ctx.block_concurrency_while(self._load())

    async def _load(self) -> None:
        await asyncio.sleep(0.01)
        if BrokenStart.fail:
            raise RuntimeError("cannot load")

    async def ping(self) -> str:
        return "pong"


class RaisingConstructor(DurableObject):
    fail = True

    def __init__(self, ctx: DurableObjectState, env: Any) -> None:
        super().__init__(ctx, env)
        if RaisingConstructor.fail:
            raise RuntimeError("ctor boom")

    async def ping(self) -> str:
        return "pong"


async def test_block_concurrency_while_in_constructor(host: ObjectHost) -> None:
    host.set_class("SlowStart", SlowStart)
    stub = host.namespace("SlowStart").get_by_name("a")
    assert await asyncio.gather(*(stub.is_ready() for _ in range(5))) == [True] * 5


async def test_failing_block_resets_the_object(host: ObjectHost) -> None:
    host.set_class("BrokenStart", BrokenStart)
    stub = host.namespace("BrokenStart").get_by_name("a")
    results = await asyncio.gather(*(stub.ping() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ObjectReset) for r in results), results
    assert "cannot load" in str(results[0])
    BrokenStart.fail = False
    assert await stub.ping() == "pong"


async def test_failing_constructor_resets_the_object(host: ObjectHost) -> None:
    host.set_class("RaisingConstructor", RaisingConstructor)
    stub = host.namespace("RaisingConstructor").get_by_name("a")
    with pytest.raises(ObjectReset, match="ctor boom"):
        await stub.ping()
    assert host.live_count() == 0
    RaisingConstructor.fail = False
    assert await stub.ping() == "pong"


class Abortable(DurableObject):
    async def hang(self) -> None:
        await asyncio.Event().wait()

    async def abort_now(self) -> None:
        self.ctx.abort("enough")

    async def ident(self) -> int:
        return id(self)


async def test_abort_resets_in_flight_calls(host: ObjectHost) -> None:
    host.set_class("Abortable", Abortable)
    stub = host.namespace("Abortable").get_by_name("a")
    first = await stub.ident()
    hanging = asyncio.ensure_future(stub.hang())
    await wait_for(lambda: host.statistics().in_flight == 1)
    with pytest.raises(ObjectReset, match="aborted: enough"):
        await stub.abort_now()
    with pytest.raises(ObjectReset, match="enough"):
        await hanging
    assert await stub.ident() != first


class Pinned(DurableObject):
    keep: set[str | None] = set()
    closed: list[str] = []

    async def fetch(self, request: Request) -> Response:
        client, server = WebSocketPair()
        server.accept()
        self.server = server
        return Response(None, status=101, web_socket=client)

    async def background(self, event: asyncio.Event) -> None:
        self.ctx.wait_until(event.wait())

    async def ping(self) -> None:
        pass

    def _dockyard_keep_alive(self) -> bool:
        return self.ctx.id.name in Pinned.keep

    async def _dockyard_close(self) -> None:
        Pinned.closed.append(self.ctx.id.name or "")


async def test_eviction_and_what_pins(host: ObjectHost) -> None:
    host.set_class("Pinned", Pinned)
    ns = host.namespace("Pinned")
    await ns.get_by_name("plain").ping()
    response = await ns.get_by_name("socket").fetch("http://x/", headers={"upgrade": "websocket"})
    event = asyncio.Event()
    await ns.get_by_name("waiting").background(event)
    Pinned.keep = {"kept"}
    await ns.get_by_name("kept").ping()
    assert host.live_count() == 4
    await wait_for(lambda: "plain" in Pinned.closed, what="eviction of the idle object")
    started = time.monotonic()
    await wait_for(lambda: time.monotonic() - started > 0.4)  # two more idle periods
    assert host.statistics().live == {"Pinned": 3}
    event.set()
    assert response.web_socket is not None
    await response.web_socket.close()
    Pinned.keep = set()
    await wait_for(lambda: host.live_count() == 0, what="all evicted")
    # Instances are closed in the background once evicted: wait for the last close.
    every = ["kept", "plain", "socket", "waiting"]
    await wait_for(lambda: sorted(Pinned.closed) == every, what="every instance closed")
    assert sorted(Pinned.closed) == every


async def test_evicted_object_is_rebuilt_with_storage_and_closed_file(host: ObjectHost) -> None:
    stub = host.namespace("Counter").get_by_name("e")
    await stub.increment()
    cell = host._cells[("Counter", stub.id.hex)]
    await wait_for(lambda: host.live_count() == 0)
    assert cell.storage.closed
    assert not Path(str(cell.storage.path) + "-wal").exists()  # noqa: ASYNC240
    assert await stub.increment() == 2
    assert Counter.builds == 2


class Versioned(DurableObject):
    version = 1

    async def ver(self, event: asyncio.Event | None = None) -> int:
        if event is not None:
            await event.wait()
        return self.version


class Versioned2(Versioned):
    version = 2


async def test_set_class_rebinds_after_in_flight_calls(host: ObjectHost) -> None:
    host.set_class("Versioned", Versioned)
    stub = host.namespace("Versioned").get_by_name("a")
    event = asyncio.Event()
    slow = asyncio.ensure_future(stub.ver(event))
    await wait_for(lambda: host.statistics().in_flight == 1)
    host.set_class("Versioned", Versioned2)
    fresh = asyncio.ensure_future(stub.ver())
    await asyncio.sleep(0.02)
    assert not fresh.done()  # the new class waits for the old instance to finish
    event.set()
    assert await slow == 1
    assert await fresh == 2


async def test_context_extension_and_statistics(host: ObjectHost) -> None:
    seen: list[DurableObjectState] = []

    class WithSlot(DurableObject):
        async def slot(self) -> object:
            return self.ctx.container

    host.set_class("WithSlot", WithSlot)
    host.set_context_extension("WithSlot", lambda state: seen.append(state) or "slot")
    assert await host.namespace("WithSlot").get_by_name("a").slot() == "slot"
    assert await host.namespace("Counter").get_by_name("a").whoami()
    assert seen[0].id.name == "a"
    stats = host.statistics()
    assert stats.live == {"WithSlot": 1, "Counter": 1} and stats.in_flight == 0


async def test_stop_closes_instances_and_refuses_calls(tmp_path: Path) -> None:
    Pinned.closed = []
    host = ObjectHost(tmp_path, app="t")
    with pytest.raises(ObjectError, match="not running"):
        await host.namespace("Pinned").get_by_name("a").ping()
    await host.start()
    host.set_class("Pinned", Pinned)
    await host.namespace("Pinned").get_by_name("a").ping()
    await host.stop()
    assert Pinned.closed == ["a"]
    assert host.live_count() == 0


class Stamped(DurableObject):
    closes: list[float] = []

    async def ping(self) -> None:
        pass

    async def _dockyard_close(self) -> None:
        Stamped.closes.append(time.monotonic())


async def test_calls_within_the_idle_timeout_keep_an_object_and_the_last_one_times_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Stamped, "closes", [])
    async with ObjectHost(tmp_path, app="t", idle_timeout=1.0) as host:
        host.set_class("Stamped", Stamped)
        stub = host.namespace("Stamped").get_by_name("s")
        last = time.monotonic()
        # Calls every quarter of the timeout for longer than the timeout: the timer armed
        # after the first call fires in between, while the object has been idle briefly.
        for _ in range(6):
            await stub.ping()
            ended, last = last, time.monotonic()
            assert last - ended < 0.9, "the machine stalled longer than the idle timeout"
            await asyncio.sleep(0.25)
        assert Stamped.closes == [] and host.live_count() == 1
        await stub.ping()
        last = time.monotonic()
        await wait_for(lambda: Stamped.closes != [], what="eviction", within=10)
        # (10 ms: the engine's timers have millisecond resolution)
        assert Stamped.closes[0] - last >= 1.0 - 0.01
