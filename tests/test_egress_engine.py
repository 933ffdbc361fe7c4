"""Egress control on the real engine: a container whose class sets allowed_hosts,
denied_hosts or outbound handlers reaches the outside only through the proxy Dockyard runs
in its own namespace. Requests are made from inside the container with busybox wget,
which honours http_proxy; the names resolve to a test listener on the host's loopback
through ``ContainerSettings.egress_hosts`` (as curl --resolve)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from dockyard.app import App
from dockyard.containers.docker import DockerRuntime
from dockyard.http import Request
from dockyard.settings import ContainerSettings, Settings
from tests.support.engine import app_name, docker_cli, remove_labelled_images

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="egress control needs root (setns)"),
]

WORKER = r"""
import os

from dockyard import Container, Response, get_container

CLIENT = '''
url=$1; extra=${2:+$2\r\n}; rest=${url#http://}; authority=${rest%%/*}
if [ -n "$3" ]; then
    target=/${rest#*/}; server=$authority; port=80
else
    [ -n "$http_proxy" ] || { echo "no http_proxy" >&2; exit 9; }
    target=$url; p=${http_proxy#http://}; server=${p%:*}; port=${p##*:}
fi
printf "GET %s HTTP/1.1\r\nHost: %s\r\n${extra}Connection: close\r\n\r\n" \
    "$target" "$authority" | nc -w 5 "$server" "$port"
'''


class Base(Container):
    default_port = 8080

    async def get(self, url, header="", direct=False):
        # busybox wget crashes in this image (static glibc), so the container's HTTP
        # client is nc: through $http_proxy as any client would, or direct.
        await self.start_and_wait_for_ports()
        result = await self.exec(["sh", "-c", CLIENT, "get", url, header, "1" if direct else ""])
        return {"exit_code": result.exit_code, "out": result.stdout.decode("latin-1"),
                "err": result.stderr.decode()}

    async def tunnel(self, authority):
        # CONNECT, then a plain request through the tunnel (the origin speaks HTTP).
        await self.start_and_wait_for_ports()
        script = ('printf "CONNECT $1 HTTP/1.1\\r\\nHost: $1\\r\\n\\r\\n'
                  'GET /tunnelled HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n"'
                  ' | nc -w 5 127.0.0.1 ${https_proxy##*:}')
        result = await self.exec(["sh", "-c", script, "tunnel", authority])
        return result.stdout.decode("latin-1")

    async def change(self, calls):
        for name, *args in calls:
            await getattr(self, name)(*args)

    async def destroy_it(self):
        await self.destroy()

    async def peer(self):
        # The peer address the container's server saw for a request forwarded to it.
        response = await self.container_fetch("http://container/cgi-bin/peer")
        return (await response.text()).strip()

    async def container_id(self):
        await self.start_and_wait_for_ports()
        return self.ctx.container.info.id


class Allowing(Base):
    allowed_hosts = ["allowed.test", "api.internal", "*.glob.test"]
    denied_hosts = ["denied.glob.test"]
    outbound_by_host = {"api.internal": "answer_api", "who.glob.test": "whoami"}

    async def answer_api(self, request):
        seen = request.headers.get("x-from-container", "-")
        return Response(f"worker saw {request.method} {request.url} {seen}\n",
                        headers={"x-handled-by": "worker"})

    async def whoami(self, request):
        return Response(f"uid={os.getuid()} pid={os.getpid()}\n")

    async def kv(self, request):
        return Response("kv handler\n", headers={"x-handled-by": "kv"})


class Catching(Base):
    enable_internet = False

    async def outbound(self, request):
        return Response(f"caught {request.url}\n", headers={"x-handled-by": "catch-all"})


class Plain(Base):
    pass


async def fetch(request, env, ctx):
    binding, name, method = request.path.strip("/").split("/")
    stub = get_container(getattr(env, binding), name)
    return Response.json(await getattr(stub, method)(*(await request.json())))
"""

DOCKERFILE = """\
FROM dockyard/busybox:latest
RUN ["sh", "-c", "mkdir -p /www && echo inside > /www/index.html"]
COPY peer /www/cgi-bin/peer
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""

CLASSES = ["Allowing", "Catching", "Plain"]


def write_project(root: Path) -> str:
    name = app_name("t-egress")
    root.mkdir(parents=True)
    (root / "worker.py").write_text(WORKER)
    # In a folder of its own: `dockyard deploy` refuses a build context at the project's
    # root ("unsafe name '.' in the bundle"), and test_egress_serve.py deploys this.
    (root / "container").mkdir()
    (root / "container" / "Dockerfile").write_text(DOCKERFILE)
    # A CGI that answers with the peer address the container's server saw.
    peer = root / "container" / "peer"
    peer.write_text(
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$REMOTE_ADDR\"\n"
    )
    peer.chmod(0o755)
    config = {
        "name": name,
        "main": "worker.py",
        "containers": [{"class_name": c, "image": "./container/Dockerfile"} for c in CLASSES],
        "durable_objects": {"bindings": [{"name": c.upper(), "class_name": c} for c in CLASSES]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": CLASSES}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config))
    return name


@pytest_asyncio.fixture
async def origin() -> AsyncIterator[int]:
    """The "outside world": one listener on the host's loopback, answering who asked."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            text=f"origin answers {request.host} {request.path}\n",
            headers={"x-origin": "yes"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port
    finally:
        await runner.cleanup()


class Lab:
    def __init__(self, app: App) -> None:
        self.app = app

    async def call(self, binding: str, name: str, method: str, *args: Any) -> Any:
        request = Request(
            f"http://app/{binding}/{name}/{method}", method="POST", body=json.dumps(list(args))
        )
        response = await self.app.handle(request)
        assert response.status == 200, await response.text()
        return await response.json()

    async def get(
        self, binding: str, name: str, url: str, header: str = "", *, direct: bool = False
    ) -> Answer:
        """What the container's own HTTP client got for ``url``."""
        result = await self.call(binding, name, "get", url, header, direct)
        return Answer.parse(result)


@dataclass
class Answer:
    exit_code: int
    status: int | None
    headers: dict[str, str]
    body: str
    err: str

    @classmethod
    def parse(cls, result: dict[str, Any]) -> Answer:
        head, _, body = result["out"].partition("\r\n\r\n")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/") else None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return cls(result["exit_code"], status, headers, body, result["err"])


class RootlessRuntime(DockerRuntime):
    """The real engine, as a process without root would see it."""

    @property
    def egress_listeners(self) -> str | None:
        return "Dockyard running as root"


@pytest_asyncio.fixture(params=[DockerRuntime])
async def lab(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    busybox_image: str,
    origin: int,
    docker_runtime: DockerRuntime,
) -> AsyncIterator[Lab]:
    name = write_project(tmp_path / "app")
    mapped = f"127.0.0.1:{origin}"
    hosts = {"allowed.test": mapped, "other.test": mapped, "a.glob.test": mapped}
    app = App(
        tmp_path / "app",
        settings=Settings(
            state_dir=tmp_path / "state",
            containers=ContainerSettings(stop_grace=2.0, egress_hosts=hosts),
        ),
        owner="test-" + secrets.token_hex(4),
        runtime=request.param(),
    )
    await app.start()
    try:
        yield Lab(app)
    finally:
        await app.stop()
        for info in await docker_runtime.list({"dockyard.app": name}):
            await docker_runtime.remove(info.id)
        await asyncio.to_thread(remove_labelled_images, f"dockyard.app={name}")


async def test_allowed_hosts_reach_the_origin_and_others_get_520(lab: Lab) -> None:
    ok = await lab.get("ALLOWING", "a", "http://allowed.test/hello")
    assert (ok.status, ok.body) == (200, "origin answers allowed.test /hello\n"), ok
    assert ok.headers["x-origin"] == "yes"
    glob = await lab.get("ALLOWING", "a", "http://a.glob.test/x")
    assert (glob.status, glob.body) == (200, "origin answers a.glob.test /x\n"), glob
    for blocked in ("http://other.test/", "http://denied.glob.test/"):
        assert (await lab.get("ALLOWING", "a", blocked)).status == 520


async def test_an_outbound_by_host_handler_answers_from_the_worker(lab: Lab) -> None:
    answer = await lab.get("ALLOWING", "h", "http://api.internal/thing?q=1", "x-from-container: hi")
    assert answer.status == 200, answer
    assert answer.body == "worker saw GET http://api.internal/thing?q=1 hi\n"
    assert answer.headers["x-handled-by"] == "worker"


async def test_the_catch_all_handler_answers_every_http_request(lab: Lab) -> None:
    answer = await lab.get("CATCHING", "c", "http://anything.example/p")
    assert (answer.status, answer.body) == (200, "caught http://anything.example/p\n"), answer
    assert answer.headers["x-handled-by"] == "catch-all"


async def test_setters_change_the_rules_of_the_running_container(lab: Lab) -> None:
    before = await lab.call("ALLOWING", "s", "container_id")
    assert (await lab.get("ALLOWING", "s", "http://other.test/")).status == 520
    await lab.call("ALLOWING", "s", "change", [["allow_host", "other.test"]])
    ok = await lab.get("ALLOWING", "s", "http://other.test/now")
    assert (ok.status, ok.body) == (200, "origin answers other.test /now\n"), ok
    await lab.call(
        "ALLOWING",
        "s",
        "change",
        [["deny_host", "allowed.test"], ["set_outbound_by_host", "other.test", "kv"]],
    )
    assert (await lab.get("ALLOWING", "s", "http://allowed.test/")).status == 520
    handled = await lab.get("ALLOWING", "s", "http://other.test/")
    assert (handled.status, handled.body) == (200, "kv handler\n"), handled
    await lab.call("ALLOWING", "s", "change", [["set_allowed_hosts", []]])
    assert (await lab.get("ALLOWING", "s", "http://other.test/")).status == 520
    # The same container all along: nothing restarted.
    assert await lab.call("ALLOWING", "s", "container_id") == before


async def test_the_hosts_own_loopback_is_never_forwarded_to(lab: Lab, origin: int) -> None:
    # Even when allowed: a container could otherwise reach every service of the host's
    # loopback (the node's control plane among them). Only names mapped in egress_hosts
    # (by the operator) may lead there.
    await lab.call("ALLOWING", "l", "change", [["set_allowed_hosts", ["*"]]])
    for url in (
        f"http://127.0.0.1:{origin}/",
        f"http://127.1:{origin}/",
        f"http://[::ffff:127.0.0.1]:{origin}/",
        f"http://localhost:{origin}/",
    ):
        answer = await lab.get("ALLOWING", "l", url)
        assert answer.status == 520, (url, answer)
        assert "the host itself" in answer.body
    assert (await lab.get("ALLOWING", "l", "http://allowed.test/")).status == 200


async def test_the_proxy_is_the_only_way_out(lab: Lab) -> None:
    assert (await lab.get("ALLOWING", "d", "http://allowed.test/")).status == 200
    # Without the proxy the same request goes nowhere.
    direct = await lab.get("ALLOWING", "d", "http://allowed.test/", direct=True)
    assert (direct.exit_code, direct.status) != (0, 200), direct
    # The container sits on the network with no route out (no NAT, and the host's
    # firewall refuses whatever the bridge would forward), and on no other.
    container_id = await lab.call("ALLOWING", "d", "container_id")
    networks = json.loads(
        await docker_cli("inspect", "-f", "{{json .NetworkSettings.Networks}}", container_id)
    )
    assert list(networks) == ["dockyard-no-internet"]
    # A class without egress rules keeps the default network and gets no proxy.
    plain = await lab.get("PLAIN", "p", "http://allowed.test/")
    assert (plain.exit_code, plain.err.strip()) == (9, "no http_proxy")


async def test_the_proxy_comes_back_with_the_next_container(lab: Lab) -> None:
    first = await lab.call("ALLOWING", "r", "container_id")
    assert (await lab.get("ALLOWING", "r", "http://allowed.test/1")).status == 200
    await lab.call("ALLOWING", "r", "destroy_it")
    again = await lab.get("ALLOWING", "r", "http://allowed.test/2")
    assert (again.status, again.body) == (200, "origin answers allowed.test /2\n"), again
    assert await lab.call("ALLOWING", "r", "container_id") != first


@pytest.mark.parametrize("lab", [RootlessRuntime], indirect=True)
async def test_without_root_a_class_with_egress_rules_does_not_start(
    lab: Lab, docker_runtime: DockerRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    request = Request(
        "http://app/ALLOWING/n/get", method="POST", body=json.dumps(["http://allowed.test/"])
    )
    response = await lab.app.handle(request)
    assert response.status == 500
    assert (
        "Allowing uses egress control (allowed_hosts, denied_hosts or outbound handlers), "
        "which needs Dockyard running as root" in caplog.text
    )
    # Nothing ran: the rules could not be applied, so no container got the chance to
    # send its traffic out unfiltered.
    assert await docker_runtime.list({"dockyard.app": lab.app.config.name}) == []
    # A class without egress rules runs as before.
    plain = await lab.get("PLAIN", "p", "http://allowed.test/")
    assert plain.err.strip() == "no http_proxy"


async def test_https_tunnels_follow_the_host_rules(lab: Lab) -> None:
    through = await lab.call("ALLOWING", "t", "tunnel", "allowed.test:443")
    assert through.startswith("HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK")
    assert through.endswith("origin answers t /tunnelled\n")
    refused = await lab.call("ALLOWING", "t", "tunnel", "other.test:443")
    assert refused.startswith("HTTP/1.1 520 ")
    assert "tunnelled" not in refused
