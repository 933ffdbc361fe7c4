"""The project and images of tests/test_container_api.py, and `dockyard` run as a user would.

The image is built once per test module (`build_api_images`) and the projects name it as a
local image reference, so starting a `dockyard dev` never builds anything. A second image,
the same files under another id, lets a test change the image between two runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.devserver import DevServer
from tests.support.engine import docker, remove_labelled_images
from tests.support.projects import IMAGES, Project

# Routes of the worker:
#   /c/<BINDING>/<name>/<path...>          the object's fetch, the client's headers kept
#   /sw/<BINDING>/<name>/<port>/<path...>  the same through switch_port(request, port)
#   /hdr/<BINDING>/<name>/<header>/<port>/<path...>  the same with <header>: <port> set
#                                          on the request by the worker
#   /cf/<BINDING>/<name>/<port>/<path...>  stub.container_fetch("/<path>", port, ...)
# and Base.fetch answers /exec-stream itself (exec_stream, streamed back).
#   /rpc/<BINDING>/<name>/<method>         a method; JSON body: [args] or {"args", "kwargs"}
# Helpers both test workers define: a JSON-able copy of a result, and a list kept in
# the object's storage.
WORKER_HELPERS = r'''
import dataclasses


def plain(value):
    """A JSON-able copy of what a public method returned (dataclasses, bytes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, bytes):
        return value.decode()
    return value


async def remember(storage, key, item):
    items = await storage.get(key) or []
    items.append(item)
    await storage.put(key, items)
'''

WORKER = (
    r"""
from dockyard import Container, Request, Response, get_container, switch_port


"""
    + WORKER_HELPERS
    + r"""

class Base(Container):
    default_port = 8080

    async def on_start(self):
        state = await self.get_state()
        await remember(self.ctx.storage, "hooks", ["on_start", state.status])

    async def on_stop(self, params):
        await remember(self.ctx.storage, "stops", [params.exit_code, params.reason])

    async def on_error(self, error):
        await remember(self.ctx.storage, "hooks", ["on_error", str(error)])
        raise error

    async def fetch(self, request):
        # POST /exec-stream runs the JSON body's command with exec_stream and streams
        # its output back as "<stream>: <chunk>" pieces, then "exit <code>".
        if request.path != "/exec-stream":
            return await super().fetch(request)
        proc = self.exec_stream(await request.json())

        async def output():
            async with proc:
                async for stream, chunk in proc:
                    yield stream.encode() + b": " + chunk
                yield f"exit {await proc.exit_code()}\n".encode()

        return Response(output())

    async def recorded(self, key):
        return await self.ctx.storage.get(key) or []

    async def record(self, payload):
        await remember(self.ctx.storage, "scheduled", payload)

    async def add_schedule(self, seconds, payload):
        return (await self.schedule(seconds, "record", payload)).id


class TwoPorts(Base):
    required_ports = [8080, 8081]
    entrypoint = ["sh", "-c", "httpd -p 8081 -h /www2 && exec httpd -f -p 8080 -h /www"]


class LatePort(Base):
    # 8081 opens only once /tmp/open-8081 exists.
    required_ports = [8080, 8081]
    entrypoint = [
        "sh", "-c",
        "httpd -p 8080 -h /www; while [ ! -f /tmp/open-8081 ]; do sleep 0.05; done; "
        "exec httpd -f -p 8081 -h /www2",
    ]


class EnvBox(Base):
    env_vars = {"GREETING": "from the class", "SHARED": "class"}


class Probed(Base):
    ping_endpoint = "probe.local/cgi-bin/probe"


class Stubborn(Base):
    # PID 1 ignores SIGTERM: only SIGKILL ends it.
    stop_timeout = 1.0
    entrypoint = [
        "sh", "-c", "trap '' TERM; httpd -p 8080 -h /www; while true; do sleep 0.2; done"
    ]


class SlowEngine(Base):
    start_timeout = 0.001


class BadEntry(Base):
    entrypoint = ["/no/such/program"]


class Keeper(Base):
    sleep_after = 1

    async def on_activity_expired(self):
        # Keep running the first time, stop the second.
        await remember(self.ctx.storage, "expired", (await self.get_state()).status)
        if len(await self.recorded("expired")) >= 2:
            await self.stop()


class Renewed(Base):
    sleep_after = "2s"


class Logger(Base):
    entrypoint = [
        "sh", "-c",
        "echo 'first line, on stdout'; echo 'second line, on stderr' >&2; "
        "exec httpd -f -p 8080 -h /www",
    ]


async def fetch(request, env, ctx):
    kind, binding, name, *rest = request.path.strip("/").split("/")
    stub = get_container(getattr(env, binding), name)
    if kind == "rpc":
        body = await request.json() if request.method == "POST" else []
        if isinstance(body, list):
            args, kwargs = body, {}
        else:
            args, kwargs = body.get("args", []), body.get("kwargs", {})
        return Response.json(plain(await getattr(stub, rest[0])(*args, **kwargs)))
    if kind == "cf":
        return await stub.container_fetch(
            "/" + "/".join(rest[1:]),
            int(rest[0]),
            method=request.method,
            headers={"X-Via": "container-fetch"},
            body=await request.bytes() if request.has_body else None,
        )
    body = request.stream() if request.has_body else None
    path = {"sw": rest[1:], "hdr": rest[2:]}.get(kind, rest)
    url = "http://container/" + "/".join(path)
    if request.query_string:
        url += "?" + request.query_string
    forwarded = Request(url, method=request.method, headers=request.headers, body=body)
    if kind == "sw":
        forwarded = switch_port(forwarded, int(rest[0]))
    if kind == "hdr":
        forwarded.headers[rest[0]] = rest[1]
    return await stub.fetch(forwarded)
"""
)

CLASSES = (
    "Base",
    "TwoPorts",
    "LatePort",
    "EnvBox",
    "Probed",
    "Stubborn",
    "SlowEngine",
    "BadEntry",
    "Keeper",
    "Renewed",
    "Logger",
)


def build_api_images(token: str) -> tuple[str, str]:
    """Two tags of the api image with different ids, both labelled `dockyard.test=<token>`."""
    first, second = f"dockyard-test/api:{token}", f"dockyard-test/api:{token}-b"
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    for args, stdin in (
        (["-t", first, str(IMAGES / "api")], None),
        (["-t", second, "-"], f"FROM {first}\nLABEL dockyard.test.variant=b\n"),
    ):
        result = subprocess.run(
            ["docker", "build", "-q", "--label", f"dockyard.test={token}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"building the api image failed: {result.stderr}")
    return first, second


def remove_test_images(token: str) -> None:
    # The second image is a child of the first: the engine removes children first only
    # when asked one by one, so go round until none is left.
    for _ in range(3):
        found = docker("image", "ls", "-q", "--filter", f"label=dockyard.test={token}").split()
        for image in set(found):
            subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True)
        if not found:
            return


def remove_app(app: str) -> None:
    """Every container, then every image, labelled with this app name."""
    containers = docker("ps", "-aq", "--filter", f"label=dockyard.app={app}").split()
    if containers:
        docker("rm", "-f", *containers)
    remove_labelled_images(f"dockyard.app={app}")


def make_api_project(
    root: Path,
    image: str,
    classes: tuple[str, ...] = CLASSES,
    *,
    name: str,
    dev: dict[str, Any] | None = None,
) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(WORKER)
    config: dict[str, Any] = {
        "name": name,
        "main": "worker.py",
        "containers": [{"class_name": c, "image": image} for c in classes],
        "durable_objects": {"bindings": [{"name": c.upper(), "class_name": c} for c in classes]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": list(classes)}],
    }
    if dev is not None:
        config["dev"] = dev
    (root / "wrangler.jsonc").write_text(json.dumps(config, indent=2))
    return Project(root, name, {c: {} for c in classes})


class DevCommand(DevServer):
    """``dockyard dev`` run with exactly ``argv`` (DevServer always adds ``--port 0``)."""

    def __init__(self, argv: list[str], project: Path) -> None:
        super().__init__(project)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv


def containers_cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dockyard containers <args> --project PROJECT``."""
    command, *rest = args
    argv = [sys.executable, "-m", "dockyard", "containers", command]
    return subprocess.run(
        [*argv, "--project", str(project), *rest],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def ready_port(dev: DevServer) -> int:
    match = re.search(r":(\d+)$", dev.url)
    assert match is not None, dev.url
    return int(match.group(1))
