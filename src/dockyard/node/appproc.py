"""Each app's own process on a node, and how the node starts, reloads and ends it.

``AppProcesses`` runs one child per app (``python -m dockyard.node.child``, see child.py),
as the app's uid when the node is root. The child gets its ``Launch`` as JSON on stdin
(never argv or environment: secrets ride in it) and reports on a pipe of its own (its
fd is ``Launch.report_fd``), one JSON line each:

    {"event": "prepared", "pid": n}   config and worker loaded, sockets listening
    {"event": "ready", "pid": n}      the app started: requests are answered
    {"log": {...}}                    a platform record (its containers' events)

Not on stdout: the worker prints there. Its output is stored as the worker's, whatever
it looks like, and a partial line of it can never swallow a report.

Its sockets live in ``run_dir/p<pid>/`` (``http.sock``, ``handoff.sock``, ``control.sock``):
a process that replaces another listens beside it, so the router switches to the new one
the moment it is prepared, while the old one finishes its requests in flight; connections
that arrive before the new one has the state folder wait in its gateway rather than fail.

Signals: SIGTERM = finish requests, stop objects, leave containers running for the next
process to adopt; SIGINT = the same, but stop and remove the containers. A process that
has not ended after its grace is killed. Everything else is asked on ``control.sock``,
whose peer is checked to be the child itself (SO_PEERCRED), as an app owns its run folder.

Over 400 lines: Launch, the child seen from the node (_Child: its pipes, reports,
control socket) and AppProcesses (slots, restarts, reloads) share one lifecycle;
platform_record and Launch could move out, and are kept here beside the only code that
reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DockyardError
from ..observe.records import LogRecord, LogSink

__all__ = [
    "AppEndpoint",
    "AppProcesses",
    "Instance",
    "Launch",
    "platform_record",
    "process_dir",
]

log = logging.getLogger("dockyard.node.apps")

# From the child's start to its "ready" (config, worker import, dependencies, adopting
# containers through the engine API); and from "prepared" to "ready" once the previous
# process has ended.
READY_TIMEOUT = 60.0
# Until NodeSettings is wired in: a crashed process restarts after 0.5 s, doubling to
# 30 s; a process that ran this long before crashing starts the back-off over.
RESTART_INITIAL = 0.5
RESTART_MAX = 30.0
RESTART_RESET_AFTER = 60.0
# The child's stderr lines kept for the message when it dies before it is ready.
TAIL_LINES = 20
# The child logs "LEVEL name: message" (child._configure_logging).
_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "error",
}
_PR_SET_PDEATHSIG = 1
# sun_path is 108 bytes, with its terminating NUL.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Launch:
    """Everything a child needs to run one version of an app; sent as JSON on stdin."""

    app: str
    version: int
    owner: str
    bundle_dir: str
    state_dir: str
    run_dir: str
    images: dict[str, str] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    uid: int | None = None
    python: str = sys.executable
    # Settings by name: stop_grace (containers), idle_timeout (objects), drain_grace
    # (requests in flight at a stop), see child.py; exit_grace: how long after the drain
    # a stopping process may take before it is killed.
    settings: dict[str, Any] = field(default_factory=dict)
    # The child's end of its report pipe; set by the node when it starts the process.
    report_fd: int | None = None

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Launch:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a launch is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def same_process(self, other: Launch) -> bool:
        """Whether ``other`` can be reloaded into a process started for this launch."""
        keep = ("app", "owner", "state_dir", "run_dir", "uid", "python", "settings")
        return all(getattr(self, k) == getattr(other, k) for k in keep)

    def grace(self, *, stop_containers: bool) -> float:
        """How long a stop may take before the child is killed."""
        drain = float(self.settings.get("drain_grace", 30.0))
        # Then objects' calls in flight and wait_until work (ObjectSettings: 5 s each),
        # and a margin.
        grace = drain + float(self.settings.get("exit_grace", 15.0))
        if stop_containers:
            grace += float(self.settings.get("stop_grace", 10.0))
        return grace


@dataclass(frozen=True)
class AppEndpoint:
    """Where the router sends an app's connections. ``pid``: the process listening there
    (a connection's SO_PEERCRED must name it)."""

    app: str
    handoff: Path
    http: Path
    pid: int | None = None


@dataclass(frozen=True)
class Instance:
    class_name: str
    object_id: str
    name: str | None
    phase: str
    container_id: str | None
    image: str | None
    idle_seconds: float
    inflight: int
    # A start is under way (the container is created, or waits for its ports).
    starting: bool = False


def platform_record(line: str, app: str, version: int) -> LogRecord | None:
    """The record in an app process's ``{"log": {...}}`` report, or None when the line is
    not one. Worker code runs in that process, so nothing in it is trusted: the app and
    version are the process's own, and a line whose fields do not have their types is
    not a record."""
    try:
        data = json.loads(line)["log"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    text = {
        name: data.get(name, "")
        for name in ("message", "level", "class_name", "object_id", "object_name")
    }
    text.update(container_id=data.get("container_id", ""), event=data.get("event", ""))
    when, fields = data.get("time"), data.get("fields", {})
    if (
        not all(isinstance(value, str) for value in text.values())
        or not isinstance(when, int | float)
        or isinstance(when, bool)
        or not math.isfinite(when)
        or not isinstance(fields, dict)
    ):
        return None
    return LogRecord(
        app=app,
        source="platform",
        stream="event",
        version=version,
        time=float(when),
        fields=fields,
        **text,
    )


def process_dir(run_dir: Path, pid: int) -> Path:
    """The folder of one child's sockets."""
    return run_dir / f"p{pid}"


class _Child:
    """One child process, seen from the node."""

    def __init__(
        self,
        launch: Launch,
        proc: asyncio.subprocess.Process,
        reports: asyncio.StreamReader,
        on_exit: Callable[[_Child, int], None],
        sink: LogSink | None = None,
    ) -> None:
        """``reports`` reads the child's report pipe; its stdout and stderr are what the
        worker prints and logs."""
        loop = asyncio.get_running_loop()
        self.launch = launch
        self.sink = sink
        self.proc = proc
        self.pid = proc.pid
        self.dir = process_dir(Path(launch.run_dir), proc.pid)
        self.started_at = time.monotonic()
        self.stopping = False
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.prepared: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        for future in (self.prepared, self.ready):
            # Nobody may wait for them (a restart fails): retrieve the error anyway.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._on_exit = on_exit
        assert proc.stdout is not None and proc.stderr is not None
        self._pumps = [
            loop.create_task(self._pump(reports, "report")),
            loop.create_task(self._pump(proc.stdout, "stdout")),
            loop.create_task(self._pump(proc.stderr, "stderr")),
        ]
        self.exited: asyncio.Task[int] = loop.create_task(self._wait())

    @property
    def endpoint(self) -> AppEndpoint | None:
        if not self.prepared.done() or self.prepared.exception() or self.exited.done():
            return None
        return AppEndpoint(
            self.launch.app, self.dir / "handoff.sock", self.dir / "http.sock", self.pid
        )

    async def _pump(self, stream: asyncio.StreamReader, kind: str) -> None:
        """Read one of the child's pipes: ``report``, ``stdout`` or ``stderr``."""
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: log it in pieces
                raw = await stream.read(64 * 1024)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if kind == "report":
                if not (line.startswith('{"event"') and self._event(line)) and not (
                    line.startswith('{"log"') and self._record(line)
                ):
                    log.warning("%s[%d]: unreadable report %.200r", self.launch.app, self.pid, line)
                continue
            if kind == "stderr":
                self.tail.append(line)
            log.info("%s[%d]: %s", self.launch.app, self.pid, line)
            if self.sink is not None:
                self.sink.emit(self._worker_line(line, stderr=kind == "stderr"))

    def _record(self, line: str) -> bool:
        """A platform event from the app process (its containers)."""
        record = platform_record(line, self.launch.app, self.launch.version)
        if record is None:
            return False
        log.info("%s[%d]: %s", self.launch.app, self.pid, record.message)
        if self.sink is not None:
            self.sink.emit(record)
        return True

    def _worker_line(self, line: str, *, stderr: bool) -> LogRecord:
        """What the worker printed (stdout) or logged (stderr, as "LEVEL name: message")."""
        level = "info"
        if stderr:
            head, _, rest = line.partition(" ")
            named = _LEVELS.get(head)
            if named is not None:
                level, line = named, rest
        return LogRecord(
            app=self.launch.app,
            message=line,
            source="worker",
            stream="stderr" if stderr else "stdout",
            level=level,
            version=self.launch.version,
        )

    def _event(self, line: str) -> bool:
        try:
            event = json.loads(line).get("event")
        except (ValueError, AttributeError):
            return False
        future = {"prepared": self.prepared, "ready": self.ready}.get(event)
        if future is None:
            return False
        if not future.done():
            future.set_result(None)
        return True

    async def _wait(self) -> int:
        code = await self.proc.wait()
        # The pipes end with the process (a grandchild could hold them: bounded).
        _, pending = await asyncio.wait(self._pumps, timeout=1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        for future in (self.prepared, self.ready):
            if not future.done():
                future.set_exception(self.died(code))
        self._on_exit(self, code)
        return code

    def died(self, code: int) -> DockyardError:
        how = f"signal {-code}" if code < 0 else f"code {code}"
        last = "\n".join(self.tail) or "(no output)"
        return DockyardError(
            f"the process of app {self.launch.app!r} exited with {how} before it was "
            f"ready; its last lines:\n{last}"
        )

    async def wait_for(self, future: asyncio.Future[None], within: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), within)
        except TimeoutError:
            last = "\n".join(self.tail) or "(no output)"
            raise DockyardError(
                f"the process of app {self.launch.app!r} was not ready within {within:.0f} s;"
                f" its last lines:\n{last}"
            ) from None

    def signal(self, signum: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    async def terminate(self, signum: int, grace: float) -> int:
        """Send ``signum``, wait ``grace`` for the exit, then SIGKILL. Returns the code."""
        self.stopping = True
        self.signal(signum)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), grace)
        except TimeoutError:
            log.warning(
                "app %s: process %d still ran %.0f s after a stop; killing it",
                self.launch.app,
                self.pid,
                grace,
            )
            self.signal(signal.SIGKILL)
            return await self.exited

    async def control(
        self, method: str, path: str, body: Any = None, *, within: float = 30.0
    ) -> Any:
        """One call to the child's control API; its JSON answer."""
        try:
            return await asyncio.wait_for(self._control(method, path, body), within)
        except TimeoutError:
            raise DockyardError(
                f"app {self.launch.app!r}: {method} {path} got no answer in {within:.0f} s"
            ) from None
        except OSError as exc:
            raise DockyardError(f"app {self.launch.app!r}: {method} {path}: {exc}") from exc

    async def _control(self, method: str, path: str, body: Any) -> Any:
        data = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        reader, writer = await asyncio.open_unix_connection(str(self.dir / "control.sock"))
        try:
            # The app owns its run folder: only talk to a socket its own process listens on.
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer_pid = struct.unpack("3i", creds)[0]
            if peer_pid != self.pid:
                raise DockyardError(
                    f"app {self.launch.app!r}: its control socket is not its process's"
                )
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: control\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, payload = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        try:
            result = json.loads(payload) if payload else None
        except ValueError:
            result = None
        if status != 200:
            error = result.get("error") if isinstance(result, dict) else None
            raise DockyardError(
                f"app {self.launch.app!r}: {error or f'{method} {path} -> {status}'}"
            )
        return result


@dataclass
class _Slot:
    """One app: the launch it should run, and the process running it."""

    launch: Launch
    current: _Child | None = None
    closing: bool = False
    backoff: float = RESTART_INITIAL
    restart: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AppProcesses:
    """The node's app processes: start, reload in place or replace, restart on a crash,
    stop. Every process is ended by ``aclose()``."""

    def __init__(
        self,
        on_exit: Callable[[str, int], None] | None = None,
        *,
        restart_initial: float = RESTART_INITIAL,
        restart_max: float = RESTART_MAX,
        sink: LogSink | None = None,
    ) -> None:
        """``sink`` receives what app processes print and log, and their platform events."""
        self.on_exit = on_exit
        self.sink = sink
        self.restart_initial = restart_initial
        self.restart_max = restart_max
        self._slots: dict[str, _Slot] = {}
        self._live: set[_Child] = set()

    async def __aenter__(self) -> AppProcesses:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- queries -------------------------------------------------------------------------

    def endpoint(self, app: str) -> AppEndpoint | None:
        slot = self._slots.get(app)
        if slot is None or slot.current is None:
            return None
        return slot.current.endpoint

    def pid(self, app: str) -> int | None:
        """The pid of the app's serving process, None when none serves."""
        endpoint = self.endpoint(app)
        return endpoint.pid if endpoint is not None else None

    async def instances(self, app: str) -> list[Instance]:
        rows = await self._current(app).control("GET", "/instances")
        return [Instance(**row) for row in rows]

    async def stop_container(self, app: str, container_id: str, *, destroy: bool) -> bool:
        """Stop one of the app's containers through the object that owns it (so its end
        reads as a stop); False when its process runs no such container."""
        if self.endpoint(app) is None:
            return False
        body = {"id": container_id, "destroy": destroy}
        # Within the stop grace the process waits for; the control call's own limit.
        answer = await self._current(app).control("POST", "/stop", body, within=120.0)
        return bool(answer.get("stopped")) if isinstance(answer, dict) else False

    async def metrics(self, app: str) -> str:
        """The app process's Prometheus exposition (observe.metrics.AppMetrics)."""
        answer = await self._current(app).control("GET", "/metrics", within=5.0)
        return str(answer["text"]) if isinstance(answer, dict) else ""

    async def replace(self, app: str, class_name: str, object_id: str) -> bool:
        child = self._current(app)
        grace = float(child.launch.settings.get("stop_grace", 10.0))
        answer = await child.control(
            "POST",
            "/replace",
            {"class": class_name, "object_id": object_id},
            within=grace + READY_TIMEOUT,
        )
        return bool(answer["replaced"])

    def _current(self, app: str) -> _Child:
        slot = self._slots.get(app)
        if slot is None or slot.current is None:
            raise DockyardError(f"app {app!r} has no running process")
        return slot.current

    # -- lifecycle -----------------------------------------------------------------------

    async def ensure(self, launch: Launch) -> None:
        """Have ``launch`` serve its app; returns when it does. Raises `DockyardError`
        when the version cannot start (the previous one, if any, keeps serving)."""
        slot = self._slots.setdefault(launch.app, _Slot(launch, backoff=self.restart_initial))
        async with slot.lock:
            slot.closing = False
            await _cancel(slot.restart)
            current = slot.current
            if current is None:
                _remove_stale_dirs(Path(launch.run_dir))
                slot.current = await self._start(launch)
            elif current.launch.same_process(launch) and await self._reload(current, launch):
                pass
            else:
                await self._switch(slot, launch)
            slot.launch = launch

    async def _reload(self, child: _Child, launch: Launch) -> bool:
        try:
            answer = await child.control("POST", "/reload", launch.to_json(), within=120.0)
        except DockyardError:
            if child.exited.done():  # gone meanwhile: a new process instead
                return False
            raise
        if answer.get("reloaded"):
            child.launch = launch
            log.info("app %s: reloaded version %d in place", launch.app, launch.version)
            return True
        return False

    async def _switch(self, slot: _Slot, launch: Launch) -> None:
        """A new process for ``launch``; the old one ends once the new one listens."""
        old = slot.current
        new = await self._spawn(launch)
        try:
            await new.wait_for(new.prepared, READY_TIMEOUT)
        except BaseException:
            await new.terminate(signal.SIGKILL, 5.0)
            raise
        # From here the router sends new connections to the new process; they wait
        # there until the old one has finished its requests and let go of the state.
        slot.current = new
        if old is not None:
            await old.terminate(signal.SIGTERM, old.launch.grace(stop_containers=False))
        try:
            await new.wait_for(new.ready, READY_TIMEOUT)
        except DockyardError:
            # Past the point of return: the crash handling restarts the app with back-off,
            # on slot.launch, still the previous version (as the node's store says,
            # since this ensure() fails).
            if not new.exited.done():
                new.signal(signal.SIGKILL)
            raise
        log.info("app %s: version %d serves in process %d", launch.app, launch.version, new.pid)

    async def _start(self, launch: Launch) -> _Child:
        child = await self._spawn(launch)
        try:
            await child.wait_for(child.ready, READY_TIMEOUT)
        except BaseException:
            await child.terminate(signal.SIGKILL, 5.0)
            raise
        log.info("app %s: version %d serves in process %d", launch.app, launch.version, child.pid)
        return child

    async def _spawn(self, launch: Launch) -> _Child:
        state_dir, run_dir = Path(launch.state_dir), Path(launch.run_dir)
        longest = process_dir(run_dir, 4_194_304) / "handoff.sock"  # (pid_max on Linux)
        if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
            raise DockyardError(
                f"app {launch.app!r}: its run folder {run_dir} is too long a path for unix "
                f"sockets ({_MAX_SOCKET_PATH} bytes at most); use a shorter data folder"
            )
        if launch.uid is not None and os.geteuid() != 0:
            raise DockyardError(f"app {launch.app!r}: running it as uid {launch.uid} needs root")
        for directory in (state_dir, run_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
            if launch.uid is not None:
                os.chown(directory, launch.uid, launch.uid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(state_dir.parent),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        # uvloop (which the node runs on) takes no user=/group=/umask=: the preexec
        # function does all of it, the same on either loop.
        report_read, report_write = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                launch.python,
                "-I",  # isolated: no PYTHON* variables, no user site, no cwd on sys.path
                "-m",
                "dockyard.node.child",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=state_dir,
                env=env,
                preexec_fn=_child_setup(launch.uid, os.getpid()),
                pass_fds=(report_write,),
                limit=1024 * 1024,
            )
        except subprocess.SubprocessError as exc:  # the preexec function failed
            os.close(report_read)
            raise DockyardError(f"app {launch.app!r}: cannot start its process: {exc}") from exc
        except OSError as exc:
            os.close(report_read)
            who = f"uid {launch.uid}" if launch.uid is not None else "the node"
            raise DockyardError(
                f"app {launch.app!r}: cannot run {launch.python} as {who}: {exc.strerror}"
                " (the interpreter and its folders must be readable by app uids)"
            ) from exc
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)  # the child's now: the pipe ends when the child does
        reports = asyncio.StreamReader(limit=1024 * 1024)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reports), os.fdopen(report_read, "rb", 0)
        )
        child = _Child(launch, proc, reports, self._exited, self.sink)
        self._live.add(child)
        assert proc.stdin is not None
        try:
            proc.stdin.write(dataclasses.replace(launch, report_fd=report_write).to_json())
            await proc.stdin.drain()
        except OSError:
            pass  # it died at once: its exit says why
        finally:
            proc.stdin.close()
        return child

    def _exited(self, child: _Child, code: int) -> None:
        self._live.discard(child)
        slot = self._slots.get(child.launch.app)
        if slot is None or slot.current is not child or child.stopping:
            return
        slot.current = None
        if time.monotonic() - child.started_at >= RESTART_RESET_AFTER:
            slot.backoff = self.restart_initial
        delay = slot.backoff
        slot.backoff = min(delay * 2, self.restart_max)
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.error(
            "app %s: process %d exited with %s; restarting in %.1f s",
            child.launch.app,
            child.pid,
            how,
            delay,
        )
        if self.on_exit is not None:
            self.on_exit(child.launch.app, code)
        if not slot.closing:
            slot.restart = asyncio.get_running_loop().create_task(self._restart(slot, delay))

    async def _restart(self, slot: _Slot, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)  # the back-off itself, not a wait for a condition
            async with slot.lock:
                if slot.closing or slot.current is not None:
                    return
                try:
                    slot.current = await self._start(slot.launch)
                    return
                except DockyardError as exc:
                    delay = slot.backoff
                    slot.backoff = min(delay * 2, self.restart_max)
                    log.error(
                        "app %s: restart failed (next in %.1f s): %s", slot.launch.app, delay, exc
                    )

    async def stop(self, app: str) -> None:
        """End the app's process after its requests in flight; containers keep running."""
        await self._end(app, stop_containers=False)

    async def destroy(self, app: str) -> None:
        """End the app's process and have it stop and remove its containers."""
        await self._end(app, stop_containers=True)

    async def aclose(self) -> None:
        """Node shutdown: every app finishes its requests and stops its containers."""
        await asyncio.gather(*(self._end(app, stop_containers=True) for app in list(self._slots)))
        # Anything a cancelled start left behind.
        for child in list(self._live):
            await child.terminate(signal.SIGKILL, 5.0)

    async def _end(self, app: str, *, stop_containers: bool) -> None:
        slot = self._slots.get(app)
        if slot is None:
            return
        slot.closing = True
        async with slot.lock:
            await _cancel(slot.restart)
            child, slot.current = slot.current, None
            if child is not None:
                signum = signal.SIGINT if stop_containers else signal.SIGTERM
                await child.terminate(signum, child.launch.grace(stop_containers=stop_containers))
            if self._slots.get(app) is slot and slot.closing:
                del self._slots[app]


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done() and task is not asyncio.current_task():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _remove_stale_dirs(run_dir: Path) -> None:
    """Socket folders of processes a previous node left (they died with it)."""
    if run_dir.is_dir():
        for entry in run_dir.glob("p[0-9]*"):
            shutil.rmtree(entry, ignore_errors=True)


def _child_setup(uid: int | None, parent: int) -> Callable[[], None]:
    libc = _libc()

    def setup() -> None:  # runs in the child between fork and exec
        os.umask(0o077)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # After the uid change, which clears the parent-death signal. A SIGKILLed node
        # takes its app processes with it; their containers stay for the next ones. (The
        # signal follows the thread that forked: the event loop's, which lives as long
        # as the node.)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the node died before prctl
            os._exit(1)

    return setup


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover - no prctl
    return ctypes.CDLL(None, use_errno=True)
