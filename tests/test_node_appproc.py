"""App processes on a node: real child processes, real unix sockets, real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard._limits import YOUNG_COLLECTION_THRESHOLD
from dockyard.containers import labels
from dockyard.containers.docker import DockerRuntime
from dockyard.errors import DockyardError
from dockyard.node.appproc import AppEndpoint, AppProcesses, Launch, platform_record
from dockyard.node.engine_api import EngineApi
from dockyard.observe.records import LogRecord
from tests.support.engine import docker_cli, wait_until

WORKER = """
import asyncio
import builtins
import gc
import os
import time
import weakref
from pathlib import Path

from dockyard import DurableObject, Response

VERSION = {version!r}


class Ring:
    # A cycle only the collector frees, made at import: a reload must not keep it forever.
    def __init__(self):
        self.me = self


RING = Ring()
builtins.__dict__.setdefault("dockyard_test_rings", []).append(weakref.ref(RING))


class Counter(DurableObject):
    async def increment(self):
        n = await self.ctx.storage.get("n") or 0
        await self.ctx.storage.put("n", n + 1)
        return n + 1


def attempt(action):
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "allowed"


async def fetch(request, env, ctx):
    path = request.path
    if path == "/hello":
        return Response(f"{{env.GREETING}} {{VERSION}}")
    if path == "/count":
        return Response.json(await env.COUNTER.get_by_name("c").increment())
    if path == "/slow":
        (Path(env.MARKS) / "slow-started").touch()
        await asyncio.sleep(1.0)
        return Response("slow done")
    if path == "/deaf":
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return Response("deaf")
    if path == "/crash":
        os._exit(3)
    if path == "/spin":
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            pass
        return Response("spun")
    if path == "/whoami":
        return Response.json({{"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
                              "umask": oct(os.umask(0o077)), "cwd": os.getcwd(),
                              "env": sorted(os.environ), "token": len(env.TOKEN)}})
    if path == "/heap":
        alive = sum(ring() is not None for ring in builtins.dockyard_test_rings)
        return Response.json({{"young": gc.get_threshold()[0], "frozen": gc.get_freeze_count(),
                              "rings": alive}})
    if path == "/probe":
        import socket

        def engine():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("/var/run/docker.sock")
            finally:
                s.close()

        return Response.json({{
            "other_state": attempt(lambda: os.listdir(env.OTHER_STATE)),
            "docker_sock": attempt(engine),
        }})
    return Response("not found", status=404)
"""

SECRET = "s3cr3t-value-that-must-not-leak"
SETTINGS = {"drain_grace": 2.0, "stop_grace": 1.0}


@pytest.fixture
def base() -> Iterator[Path]:
    # Short (unix socket paths are limited to 108 bytes) and traversable by app uids.
    path = Path(tempfile.mkdtemp(prefix="dyap", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def app_python() -> Iterator[str]:
    """An interpreter app uids can run. This one may live under /root (0700): then a
    venv of the system's Python 3.11 that sees this one's packages (the app's venv's
    interpreter, as Launch.python allows)."""
    if _others_can_run(Path(sys.executable)):
        yield sys.executable
        return
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    system = Path("/usr/bin") / version
    if not system.exists() or not _others_can_run(system):
        pytest.skip(f"no {version} that app uids can run")
    venv = Path(tempfile.mkdtemp(prefix="dyvenv", dir="/tmp"))
    venv.chmod(0o755)
    try:
        subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
        site = venv / "lib" / version / "site-packages"
        purelib = sysconfig.get_paths()["purelib"]
        (site / "dockyard-test.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
        yield str(venv / "bin" / "python")
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def _others_can_run(path: Path) -> bool:
    real = path.resolve()
    folders_ok = all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    return folders_ok and bool(real.stat().st_mode & stat.S_IXOTH)


@pytest.fixture
async def processes() -> AsyncIterator[AppProcesses]:
    exits: list[tuple[str, int]] = []
    procs = AppProcesses(on_exit=lambda app, code: exits.append((app, code)))
    procs.exits = exits  # type: ignore[attr-defined]
    try:
        yield procs
    finally:
        await procs.aclose()
        assert _children() == [], "a child outlived aclose()"


def make_bundle(
    base: Path, app: str, version: str, *, extra_binding: bool = False, worker: str | None = None
) -> Path:
    bundle = base / "bundles" / f"{app}-{version}"
    bundle.mkdir(parents=True)
    (bundle / "worker.py").write_text(
        worker if worker is not None else textwrap.dedent(WORKER.format(version=version))
    )
    bindings = [{"name": "COUNTER", "class_name": "Counter"}]
    if extra_binding:
        bindings.append({"name": "COUNTER2", "class_name": "Counter"})
    config = {
        "name": app,
        "main": "worker.py",
        "durable_objects": {"bindings": bindings},
        "migrations": [{"tag": "v1", "new_sqlite_classes": ["Counter"]}],
    }
    (bundle / "wrangler.jsonc").write_text(json.dumps(config))
    for path in (bundle.parent, bundle, *bundle.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return bundle


def make_launch(base: Path, app: str, bundle: Path, version: int = 1, **changes: Any) -> Launch:
    fields: dict[str, Any] = {
        "app": app,
        "version": version,
        "owner": "test-appproc",
        "bundle_dir": str(bundle),
        "state_dir": str(base / "apps" / app / "state"),
        "run_dir": str(base / "run" / app),
        "vars": {
            "GREETING": "hello",
            "OTHER_STATE": str(base / "apps" / "other" / "state"),
            "MARKS": str(base / "apps" / app / "state"),
        },
        "secrets": {"TOKEN": SECRET},
        "uid": None,
        "python": sys.executable,
        "settings": SETTINGS,
    }
    fields.update(changes)
    return Launch(**fields)


async def fetch(endpoint: AppEndpoint | None, path: str) -> tuple[int, str]:
    assert endpoint is not None, "the app does not serve"
    connector = aiohttp.UnixConnector(path=str(endpoint.http))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://app{path}", timeout=aiohttp.ClientTimeout(total=20)) as r:
            return r.status, await r.text()


def _children() -> list[int]:
    """Live (not zombie) processes of this test process running the child module."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"dockyard.node.child" in cmdline:
            found.append(int(entry.name))
    return found


async def test_child_serves_on_its_socket_and_ends_with_aclose(
    base: Path, processes: AppProcesses
) -> None:
    procs = processes
    launch = make_launch(base, "one", make_bundle(base, "one", "v1"))
    assert procs.endpoint("one") is None
    await procs.ensure(launch)
    endpoint = procs.endpoint("one")
    assert endpoint is not None
    assert await fetch(endpoint, "/hello") == (200, "hello v1")
    _, body = await fetch(endpoint, "/whoami")
    who = json.loads(body)
    assert who["pid"] == endpoint.pid
    assert who["umask"] == "0o77"
    assert who["cwd"] == launch.state_dir
    assert who["env"] == ["HOME", "LANG", "PATH"]
    assert who["token"] == len(SECRET)  # the secret arrived, through stdin
    proc = Path("/proc") / str(endpoint.pid)
    assert SECRET.encode() not in (proc / "cmdline").read_bytes()
    assert SECRET.encode() not in (proc / "environ").read_bytes()
    assert _children() == [endpoint.pid]
    await procs.aclose()
    assert procs.endpoint("one") is None
    assert _children() == []
    assert not endpoint.http.exists()


async def test_a_child_that_dies_before_ready_reports_its_last_lines(
    base: Path, processes: AppProcesses
) -> None:
    bundle = make_bundle(
        base,
        "bad",
        "v1",
        worker="class Counter:\n    pass\n\nraise RuntimeError('boom at import')\n",
    )
    with pytest.raises(DockyardError, match="boom at import"):
        await processes.ensure(make_launch(base, "bad", bundle))
    assert processes.endpoint("bad") is None


async def test_what_a_worker_prints_never_passes_for_the_processs_own_reports(
    base: Path,
) -> None:
    """The worker shares the process's stdout: a partial line must not swallow the
    process's "prepared" report, and a printed report or platform event stays the
    worker's own output."""
    fake_event = json.dumps(
        {"log": {"message": "container started in 1 ms", "time": 1.0, "event": "container.start"}}
    )
    worker = WORKER.format(version="v1") + textwrap.dedent(
        f"""
        print({fake_event!r})
        print('{{"event": "ready", "pid": 1}}')
        print("loading", end="")
        """
    )
    bundle = make_bundle(base, "chatty", "v1", worker=textwrap.dedent(worker))
    records: list[LogRecord] = []

    class Sink:
        def emit(self, record: LogRecord) -> None:
            records.append(record)

    procs = AppProcesses(sink=Sink())
    try:
        await asyncio.wait_for(procs.ensure(make_launch(base, "chatty", bundle)), 30)
        assert await fetch(procs.endpoint("chatty"), "/hello") == (200, "hello v1")
        # Printed lines arrive as they are printed, not when the process ends.
        await wait_until(lambda: _async(fake_event in [r.message for r in records]))
    finally:
        await procs.aclose()
    assert [r for r in records if r.source == "platform"] == []
    printed = [r.message for r in records if r.stream == "stdout"]
    assert fake_event in printed
    assert '{"event": "ready", "pid": 1}' in printed


async def _load(
    endpoint_of: Any, path: str, stop: asyncio.Event, results: list[tuple[int, str]]
) -> None:
    while not stop.is_set():
        endpoint = endpoint_of()
        try:
            try:
                results.append(await fetch(endpoint, path))
            except aiohttp.ClientConnectorError:
                # As the router does: the process it looked up may have been replaced
                # before it connected; it asks again once, and only if the answer changed.
                again = endpoint_of()
                if again == endpoint:
                    raise
                results.append(await fetch(again, path))
        except aiohttp.ClientError as exc:
            results.append((0, repr(exc)))


@pytest.mark.slow
async def test_reload_in_place_changes_the_answer_and_fails_no_request(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "rel", make_bundle(base, "rel", "v1")))
    pid = processes.pid("rel")
    stop = asyncio.Event()
    results: list[tuple[int, str]] = []
    load = [
        asyncio.create_task(_load(lambda: processes.endpoint("rel"), "/hello", stop, results))
        for _ in range(2)
    ]
    try:
        await wait_until(lambda: _async(len(results) >= 20))
        v2 = make_launch(
            base,
            "rel",
            make_bundle(base, "rel", "v2"),
            version=2,
            vars={"GREETING": "bonjour", "OTHER_STATE": "-"},
        )
        await processes.ensure(v2)
        seen = len(results)
        await wait_until(lambda: _async(len(results) >= seen + 20))
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert processes.pid("rel") == pid  # in place: same process
    assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:3]
    assert results[-1] == (200, "bonjour v2")
    assert {body for _, body in results} == {"hello v1", "bonjour v2"}


async def test_the_app_process_keeps_its_loaded_heap_out_of_collections_but_not_past_a_reload(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "heap", make_bundle(base, "heap", "v1")))
    status, body = await fetch(processes.endpoint("heap"), "/heap")
    heap = json.loads(body)
    assert status == 200 and heap["young"] == YOUNG_COLLECTION_THRESHOLD
    assert heap["frozen"] > 10_000 and heap["rings"] == 1
    await processes.ensure(make_launch(base, "heap", make_bundle(base, "heap", "v2"), version=2))
    # v1's module (and its ring) is unreachable now, and frozen: the reload unfroze and
    # collected it, then froze what v2 loaded.
    status, body = await fetch(processes.endpoint("heap"), "/heap")
    assert status == 200 and json.loads(body)["rings"] == 1, body


@pytest.mark.slow
async def test_a_new_shape_gets_a_new_process_without_failed_requests(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "shape", make_bundle(base, "shape", "v1")))
    old = processes.pid("shape")
    assert await fetch(processes.endpoint("shape"), "/count") == (200, "1")
    stop = asyncio.Event()
    results: list[tuple[int, str]] = []
    load = [
        asyncio.create_task(_load(lambda: processes.endpoint("shape"), "/hello", stop, results))
        for _ in range(2)
    ]
    try:
        await wait_until(lambda: _async(len(results) >= 20))
        bundle = make_bundle(base, "shape", "v2", extra_binding=True)
        await processes.ensure(make_launch(base, "shape", bundle, version=2))
        seen = len(results)
        await wait_until(lambda: _async(len(results) >= seen + 20))
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert processes.pid("shape") != old
    assert _children() == [processes.pid("shape")]
    assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:3]
    assert results[-1] == (200, "hello v2")
    # The new process has the same objects' storage.
    assert await fetch(processes.endpoint("shape"), "/count") == (200, "2")


async def test_a_version_whose_worker_fails_keeps_the_old_one_serving(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "keep", make_bundle(base, "keep", "v1")))
    pid = processes.pid("keep")
    broken = make_bundle(base, "keep", "v2", worker="def fetch(:\n")
    with pytest.raises(DockyardError, match="invalid Python syntax"):
        await processes.ensure(make_launch(base, "keep", broken, version=2))
    assert processes.pid("keep") == pid
    assert await fetch(processes.endpoint("keep"), "/hello") == (200, "hello v1")


@pytest.mark.slow
async def test_a_crashed_child_is_restarted_and_its_objects_keep_their_storage(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "crash", make_bundle(base, "crash", "v1")))
    first = processes.pid("crash")
    assert await fetch(processes.endpoint("crash"), "/count") == (200, "1")
    assert await fetch(processes.endpoint("crash"), "/count") == (200, "2")
    with pytest.raises(aiohttp.ClientError):
        await fetch(processes.endpoint("crash"), "/crash")

    async def restarted() -> int | None:
        pid = processes.pid("crash")
        return pid if pid is not None and pid != first else None

    second = await wait_until(restarted, within=15)
    assert await fetch(processes.endpoint("crash"), "/count") == (200, "3")
    assert processes.exits == [("crash", 3)]  # type: ignore[attr-defined]
    assert _children() == [second]


@pytest.mark.slow
async def test_a_spinning_app_does_not_delay_another_app(
    base: Path, processes: AppProcesses
) -> None:
    await processes.ensure(make_launch(base, "spin", make_bundle(base, "spin", "v1")))
    await processes.ensure(make_launch(base, "calm", make_bundle(base, "calm", "v1")))
    stop = asyncio.Event()
    spins: list[tuple[int, str]] = []
    spinner = asyncio.create_task(_load(lambda: processes.endpoint("spin"), "/spin", stop, spins))
    latencies = []
    try:
        await wait_until(lambda: _async(len(spins) >= 1))
        connector = aiohttp.UnixConnector(path=str(processes.endpoint("calm").http))  # type: ignore[union-attr]
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(100):
                started = time.perf_counter()
                async with session.get("http://calm/hello") as response:
                    assert await response.text() == "hello v1"
                latencies.append(time.perf_counter() - started)
    finally:
        stop.set()
        await spinner
    latencies.sort()
    p99 = latencies[98]
    print(
        f"calm app while another spins: p50 {latencies[49] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    assert len(spins) >= 2
    assert p99 < 0.050


@pytest.mark.skipif(os.geteuid() != 0, reason="separate uids need a root node")
async def test_as_root_each_child_runs_as_its_uid_and_sees_only_its_own(
    base: Path, processes: AppProcesses, app_python: str
) -> None:
    other = make_launch(
        base, "other", make_bundle(base, "other", "v1"), uid=61902, python=app_python
    )
    await processes.ensure(other)
    launch = make_launch(
        base, "mine", make_bundle(base, "mine", "v1"), uid=61901, python=app_python
    )
    await processes.ensure(launch)
    endpoint = processes.endpoint("mine")
    who = json.loads((await fetch(endpoint, "/whoami"))[1])
    assert (who["uid"], who["gid"]) == (61901, 61901)
    assert os.stat(launch.state_dir).st_uid == 61901
    assert os.stat(launch.state_dir).st_mode & 0o777 == 0o700
    status = (Path("/proc") / str(who["pid"]) / "status").read_text().splitlines()
    groups = next(line for line in status if line.startswith("Groups:"))
    assert groups.split(":", 1)[1].split() == []  # no supplementary groups (docker's, root's)
    probe = json.loads((await fetch(endpoint, "/probe"))[1])
    assert probe == {"other_state": "PermissionError", "docker_sock": "PermissionError"}


def _async(value: Any) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


@pytest.mark.slow
async def test_stop_lets_a_request_in_flight_finish(base: Path, processes: AppProcesses) -> None:
    launch = make_launch(base, "drain", make_bundle(base, "drain", "v1"))
    await processes.ensure(launch)
    endpoint = processes.endpoint("drain")
    request = asyncio.create_task(fetch(endpoint, "/slow"))
    mark = Path(launch.state_dir) / "slow-started"
    await wait_until(lambda: _async(mark.exists() or request.done()))
    await processes.stop("drain")
    assert await request == (200, "slow done")
    assert processes.endpoint("drain") is None
    assert _children() == []


NODE = """
import asyncio
import sys

import uvloop

from dockyard.node.appproc import AppProcesses, Launch


async def main():
    launch = Launch.from_json(sys.stdin.read())
    processes = AppProcesses()
    await processes.ensure(launch)
    print(processes.pid(launch.app), flush=True)
    await asyncio.Event().wait()


uvloop.run(main())
"""


@pytest.mark.slow
async def test_a_sigkilled_node_takes_its_children_along(base: Path, app_python: str) -> None:
    # The node on uvloop (as `dockyard serve` runs), as root with an app uid when it can:
    # the parent-death signal must survive the uid change.
    uid = 61903 if os.geteuid() == 0 else None
    python = app_python if uid is not None else sys.executable
    launch = make_launch(base, "orphan", make_bundle(base, "orphan", "v1"), uid=uid, python=python)
    node = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        NODE,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert node.stdin is not None and node.stdout is not None
        node.stdin.write(launch.to_json())
        node.stdin.close()
        line = await asyncio.wait_for(node.stdout.readline(), 30)
        child = int(line)
        assert _alive(child)
    finally:
        node.kill()
        await node.wait()
    try:
        await wait_until(lambda: _async(not _alive(child)), within=10)
    finally:
        if _alive(child):  # (only when the test fails)
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_child_that_ignores_the_stop_is_killed_after_its_grace(
    base: Path, processes: AppProcesses
) -> None:
    settings = {"drain_grace": 0.5, "stop_grace": 0.5, "exit_grace": 0.5}
    launch = make_launch(base, "deaf", make_bundle(base, "deaf", "v1"), settings=settings)
    await processes.ensure(launch)
    assert await fetch(processes.endpoint("deaf"), "/deaf") == (200, "deaf")
    started = time.monotonic()
    await processes.destroy("deaf")
    took = time.monotonic() - started
    assert _children() == []
    assert 1.0 <= took < 5.0  # grace = drain + exit + containers' stop = 1.5 s
    assert processes.exits == []  # type: ignore[attr-defined]  # a stop, not a crash


CONTAINER_WORKER = """
from dockyard import Container, Response, get_container


class Web(Container):
    default_port = 8080
    entrypoint = ["httpd", "-f", "-p", "8080", "-h", "/"]


async def fetch(request, env, ctx):
    response = await get_container(env.WEB, "one").fetch(request)
    return Response(f"container answered {response.status}")
"""


def container_bundle(base: Path, app: str, image: str) -> Path:
    bundle = base / "bundles" / app
    bundle.mkdir(parents=True)
    (bundle / "worker.py").write_text(CONTAINER_WORKER)
    config = {
        "name": app,
        "main": "worker.py",
        "containers": [{"class_name": "Web", "image": image}],
        "durable_objects": {"bindings": [{"name": "WEB", "class_name": "Web"}]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web"]}],
    }
    (bundle / "wrangler.jsonc").write_text(json.dumps(config))
    return bundle


def make_dirs(path: Path) -> None:
    path.mkdir(parents=True)


@pytest.mark.docker
@pytest.mark.slow
async def test_stop_leaves_containers_for_the_next_process_and_destroy_removes_them(
    base: Path,
    processes: AppProcesses,
    docker_runtime: DockerRuntime,
    test_labels: dict[str, str],
    busybox_image: str,
) -> None:
    app = test_labels[labels.APP]  # the fixture removes the app's containers afterwards
    owner = f"owner-{secrets.token_hex(4)}"
    ref = f"dockyard/appproc-test:{secrets.token_hex(4)}"
    await docker_cli("tag", busybox_image, ref)
    launch = make_launch(
        base, app, container_bundle(base, app, busybox_image), owner=owner, images={"Web": ref}
    )
    run_dir = Path(launch.run_dir)
    make_dirs(run_dir)
    try:
        async with EngineApi(docker_runtime, owner) as api:
            await api.open(app, run_dir / "engine.sock", lambda: {ref}, None)
            await processes.ensure(launch)
            status, body = await fetch(processes.endpoint(app), "/")
            assert (status, body.split(" ")[:2]) == (200, ["container", "answered"])
            [instance] = await processes.instances(app)
            assert (instance.class_name, instance.image) == ("Web", ref)
            assert instance.container_id is not None

            await processes.stop(app)  # a hand-over: the container keeps running
            info = await docker_runtime.inspect(instance.container_id)
            assert info is not None and info.running

            await processes.ensure(launch)  # the next process adopts it
            assert (await fetch(processes.endpoint(app), "/"))[0] == 200
            [again] = await processes.instances(app)
            assert again.container_id == instance.container_id

            await processes.destroy(app)  # stops and removes it
            assert await docker_runtime.list({labels.APP: app}) == []
    finally:
        await docker_cli("image", "rm", ref)


def test_platform_records_from_an_app_process_are_its_own_and_well_typed() -> None:
    """Worker code shares the app process's stdout: a line claiming another app is stored
    as this one's, and a line with a wrong type is no record at all."""
    event = {
        "app": "someone-else",
        "message": "container started in 80 ms",
        "time": 1_700_000_000.5,
        "class_name": "Web",
        "object_id": "ab" * 32,
        "event": "container.start",
        "fields": {"cold_start_ms": 80.0},
        "source": "worker",
        "version": 99,
    }
    record = platform_record(json.dumps({"log": event}), "mine", 3)
    assert record is not None
    assert (record.app, record.version, record.source, record.stream) == (
        "mine",
        3,
        "platform",
        "event",
    )
    assert (record.event, record.fields, record.time) == (
        "container.start",
        {"cold_start_ms": 80.0},
        1_700_000_000.5,
    )
    for broken in (
        {**event, "time": "soon"},
        {**event, "time": float("nan")},
        {**event, "time": True},
        {**event, "message": ["not", "text"]},
        {**event, "fields": "none"},
        "a string",
    ):
        assert platform_record(json.dumps({"log": broken}), "mine", 3) is None, broken
    assert platform_record('{"log": not json', "mine", 3) is None
