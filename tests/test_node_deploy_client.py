"""The deploy side of a node: bundles, credentials, the API client and `dockyard deploy`.

The API is a small aiohttp app on loopback that records what it was asked; the CLI runs
as a real process (`python -m dockyard`), as a user runs it. The real node is the lead's
end-to-end test (test_platform_e2e.py).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import stat
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from dockyard.config import load_config
from dockyard.containers.docker import DockerRuntime
from dockyard.errors import DockyardError
from dockyard.node.bundle import BundleError, BundleExists, BundleTooLarge, pack, unpack
from dockyard.node.client import (
    Credentials,
    NodeClient,
    NodeError,
    credentials_path,
    resolve_credentials,
    save_credentials,
)
from tests.support.engine import wait_until

WORKER = """
from dockyard import Container, Response


class Web(Container):
    default_port = 8080


async def on_fetch(request, env):
    return Response("hello")
"""


def make_project(root: Path, *, name: str = "demo", container: str | None = None) -> Path:
    """A project with a worker; with `container`, a class built from that Dockerfile text."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "worker.py").write_text(WORKER)
    config: dict[str, Any] = {
        "name": name,
        "main": "src/worker.py",
        "compatibility_date": "2026-11-01",
    }
    if container is not None:
        (root / "container").mkdir()
        (root / "container" / "Dockerfile").write_text(container)
        config |= {
            "containers": [{"class_name": "Web", "image": "./container/Dockerfile"}],
            "durable_objects": {"bindings": [{"class_name": "Web", "name": "WEB"}]},
            "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web"]}],
        }
    (root / "wrangler.jsonc").write_text(json.dumps(config, indent=2))
    return root


def names_in(bundle: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        return tar.getnames()


# -- pack -----------------------------------------------------------------------------------


def test_pack_is_deterministic_and_follows_edits(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    first, digest = pack(project, load_config(project))
    assert hashlib.sha256(first).hexdigest() == digest
    # New mtimes (a fresh checkout) do not change the bundle; an edit does.
    os.utime(project / "src" / "worker.py", (1, 1))
    assert pack(project, load_config(project)) == (first, digest)
    (project / "src" / "worker.py").write_text(WORKER + "\n# edited\n")
    assert pack(project, load_config(project))[1] != digest


def test_pack_normalises_owner_time_and_mode(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    tool = project / "run.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o750)
    (project / "src" / "worker.py").chmod(0o600)
    bundle, _ = pack(project)
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert [m.mtime for m in members.values()] == [0] * len(members)
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}
    assert members["run.sh"].mode == 0o755
    assert members["src/worker.py"].mode == 0o644
    assert members["src"].mode == 0o755 and members["src"].isdir()
    assert list(members) == sorted(members)
    # The gzip header carries neither a time nor a file name.
    assert bundle[4:8] == b"\0\0\0\0"


def test_pack_honours_the_ignore_file_and_never_packs_local_secrets(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    for name in ["notes.log", "keep.log", "build/out.bin", "docs/a.md", "src/__pycache__/x.pyc"]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(name)
    for name in [".dev.vars", ".dev.vars.staging", ".git/HEAD", ".venv/bin/python"]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("SECRET=1")
    (project / "node_modules" / "x").mkdir(parents=True)
    (project / "node_modules" / "x" / "i.js").write_text("")
    # `!` cannot bring back what is always excluded; the config file is packed regardless.
    (project / ".dockyardignore").write_text(
        "*.log\n!keep.log\nbuild/\n!.dev.vars\n!.git/\nwrangler.jsonc\n"
    )
    bundle, _ = pack(project, load_config(project))
    assert names_in(bundle) == [
        ".dockyardignore",
        "docs",
        "docs/a.md",
        "keep.log",
        "src",
        "src/worker.py",
        "wrangler.jsonc",
    ]
    assert b"SECRET=1" not in gzip.decompress(bundle)


def test_pack_refuses_a_symlink_out_of_the_project(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    (tmp_path / "outside.txt").write_text("private")
    (project / "src" / "inside.txt").write_text("shared")
    (project / "src" / "alias.txt").symlink_to("inside.txt")
    bundle, _ = pack(project)
    # A link inside the project is packed as the file it points to (no links in bundles).
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        alias = tar.getmember("src/alias.txt")
        assert alias.isreg()
        assert tar.extractfile(alias).read() == b"shared"  # type: ignore[union-attr]
    (project / "src" / "leak.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(BundleError, match=r"src/leak.txt is a symlink .* outside the project"):
        pack(project)
    (project / "src" / "leak.txt").unlink()
    (project / "up").symlink_to(tmp_path)
    with pytest.raises(BundleError, match="up is a symlink"):
        pack(project)


# -- unpack ---------------------------------------------------------------------------------


def archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def entry(name: str, data: bytes | None = b"x", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    if data is not None:
        info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data or b""


def test_unpack_round_trips_a_packed_project(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    bundle, _ = pack(project, load_config(project))
    dest = unpack(bundle, tmp_path / "apps" / "demo" / "bundles" / "h1")
    assert (dest / "src" / "worker.py").read_text() == WORKER
    assert load_config(dest).name == "demo"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "wrangler.jsonc").stat().st_mode) == 0o644
    # From a file too (the node spools uploads to disk).
    (tmp_path / "upload.tgz").write_bytes(bundle)
    again = unpack(tmp_path / "upload.tgz", tmp_path / "again")
    assert (again / "src" / "worker.py").read_bytes() == WORKER.encode()
    with pytest.raises(BundleExists):
        unpack(bundle, dest)


def test_a_dockerfile_at_the_project_root_packs_and_unpacks(tmp_path: Path) -> None:
    """The seed's layout: `"image": "./Dockerfile"`, so the build context is the project."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "worker.py").write_text(
        "from dockyard import Container\n\n\nclass Web(Container):\n    default_port = 8080\n"
    )
    (project / "Dockerfile").write_text("FROM scratch\n")
    (project / "wrangler.jsonc").write_text(
        json.dumps(
            {
                "name": "rooted",
                "main": "worker.py",
                "containers": [{"class_name": "Web", "image": "./Dockerfile"}],
                "durable_objects": {"bindings": [{"name": "WEB", "class_name": "Web"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web"]}],
            }
        )
    )
    bundle, _ = pack(project, load_config(project))
    dest = unpack(bundle, tmp_path / "out")
    assert (dest / "Dockerfile").read_text() == "FROM scratch\n"
    assert load_config(dest).containers[0].class_name == "Web"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([entry("/etc/evil")], "unsafe name '/etc/evil'"),
        ([entry("../evil")], r"unsafe name '\.\./evil'"),
        ([entry("ok"), entry("a/../../evil")], "unsafe name"),
        ([entry("link", None, type=tarfile.SYMTYPE, linkname="/etc/passwd")], "is a symlink"),
        ([entry("inner", None, type=tarfile.SYMTYPE, linkname="src")], "is a symlink"),
        ([entry("f"), entry("hard", None, type=tarfile.LNKTYPE, linkname="f")], "hard link"),
        ([entry("dev", None, type=tarfile.CHRTYPE, devmajor=1, devminor=3)], "is a device"),
        ([entry("fifo", None, type=tarfile.FIFOTYPE)], "is a fifo"),
        ([entry("twice"), entry("twice")], "appears twice"),
        ([entry("a"), entry("a/b")], "conflicting names"),
    ],
)
def test_unpack_refuses_unsafe_entries_and_leaves_nothing(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    # A good file first: a refusal part-way must still leave no trace at all.
    data = archive(entry("good.txt", b"fine"), *members)
    parent = tmp_path / "bundles"
    with pytest.raises(BundleError, match=message):
        unpack(data, parent / "h1")
    assert list(parent.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_unpack_caps_size_and_file_count(tmp_path: Path) -> None:
    big = archive(entry("a", b"1" * 600), entry("b", b"2" * 600))
    with pytest.raises(BundleTooLarge, match="more than 1000 bytes"):
        unpack(big, tmp_path / "x", max_bytes=1000)
    # A header that claims more than the cap is refused before anything is read.
    claimed = tarfile.TarInfo("huge")
    claimed.size = 10**12
    header = claimed.tobuf(format=tarfile.PAX_FORMAT)
    with pytest.raises(BundleTooLarge):
        unpack(gzip.compress(header), tmp_path / "y", max_bytes=10**9)
    many = archive(*(entry(f"f{i}") for i in range(11)))
    with pytest.raises(BundleError, match="more than 10 entries"):
        unpack(many, tmp_path / "z", max_files=10)
    assert unpack(many, tmp_path / "ok", max_files=11).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_unpack_caps_what_it_decompresses(tmp_path: Path) -> None:
    # A pax header is metadata, not file content: tarfile reads it whole into memory. A
    # few KiB of gzip can claim megabytes of it; the cap on decompressed bytes stops it.
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 4 * 1024 * 1024
    block = header.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * header.size
    bomb = gzip.compress(block + entry("f")[0].tobuf() + b"x".ljust(512, b"\0"))
    assert len(bomb) < 16 * 1024
    with pytest.raises(BundleTooLarge, match="decompresses to more than"):
        unpack(bomb, tmp_path / "x", max_bytes=1000, max_files=10)
    assert list(tmp_path.iterdir()) == []


def test_unpack_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    bundle, _ = pack(make_project(tmp_path / "p"))
    for data in (b"not gzip at all", bundle[: len(bundle) // 2]):
        with pytest.raises(BundleError, match="not a valid bundle"):
            unpack(data, tmp_path / "bundles" / "h")
        assert list((tmp_path / "bundles").iterdir()) == []


# -- credentials ----------------------------------------------------------------------------


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("DOCKYARD_SERVER", raising=False)
    monkeypatch.delenv("DOCKYARD_TOKEN", raising=False)
    return home


def test_credentials_file_is_private(config_home: Path) -> None:
    path = save_credentials(Credentials("http://127.0.0.1:8788", "dy_secret"))
    assert path == config_home / "dockyard" / "credentials.json" == credentials_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"server": "http://127.0.0.1:8788", "token": "dy_secret"}
    # Rewriting keeps it private (and leaves no temporary file behind).
    save_credentials(Credentials("http://127.0.0.1:8788", "dy_other"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]


def test_credentials_precedence(config_home: Path) -> None:
    assert resolve_credentials(environ={}) is None
    save_credentials(Credentials("http://127.0.0.1:8788/", "dy_file"))
    assert resolve_credentials(environ={}) == Credentials("http://127.0.0.1:8788", "dy_file")
    env = {"DOCKYARD_TOKEN": "dy_env"}
    assert resolve_credentials(environ=env) == Credentials("http://127.0.0.1:8788", "dy_env")
    env = {"DOCKYARD_SERVER": "127.0.0.1:9999", "DOCKYARD_TOKEN": "dy_env"}
    assert resolve_credentials(environ=env) == Credentials("http://127.0.0.1:9999", "dy_env")
    assert resolve_credentials("http://127.0.0.1:7777", environ=env) == Credentials(
        "http://127.0.0.1:7777", "dy_env"
    )
    # The stored token belongs to its server: never sent to another one.
    with pytest.raises(DockyardError, match=r"no token for http://127.0.0.1:9999"):
        resolve_credentials(environ={"DOCKYARD_SERVER": "http://127.0.0.1:9999"})
    assert resolve_credentials("http://127.0.0.1:8788", environ={}) == Credentials(
        "http://127.0.0.1:8788", "dy_file"
    )


@pytest.mark.parametrize(
    ("advertised", "pushed_to"),
    [
        ("127.0.0.1:8788", "127.0.0.1:8788"),
        ("node.example:8788", "node.example:8788"),
        # A node listening on every address cannot say which one reaches it.
        ("0.0.0.0:8788", "node.example:9000"),
        ("[::]:8788", "node.example:9000"),
        ("", "node.example:9000"),
    ],
)
def test_images_are_pushed_where_the_node_is_reachable(advertised: str, pushed_to: str) -> None:
    from dockyard.cli.deploy import registry_address

    assert registry_address(advertised, "https://node.example:9000") == pushed_to


# -- a fake node API ------------------------------------------------------------------------


@dataclass
class FakeNode:
    """An aiohttp app on loopback: answers from `routes`, records every request."""

    routes: dict[tuple[str, str], Callable[[web.Request, bytes], Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)
    auth: list[str | None] = field(default_factory=list)
    url: str = ""

    def answer(self, method: str, path: str, status: int, body: Any = None) -> None:
        self.routes[(method, "/api/v1" + path)] = lambda _r, _b: (status, body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = (request.method, request.rel_url.raw_path)
        self.calls.append(key)
        self.bodies[key] = body
        self.auth.append(request.headers.get("Authorization"))
        route = self.routes.get(key)
        if route is None:
            return web.json_response({"error": "not faked", "id": "fake0000"}, status=404)
        status, payload = route(request, body)
        if isinstance(payload, str):
            return web.Response(status=status, text=payload)
        if payload is None:
            return web.Response(status=status)
        return web.json_response(payload, status=status)


@pytest_asyncio.fixture
async def fake_node() -> AsyncIterator[FakeNode]:
    node = FakeNode()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", node.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    node.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield node
    finally:
        await runner.cleanup()


# -- NodeClient -----------------------------------------------------------------------------


async def test_client_shows_the_nodes_error_and_its_id(fake_node: FakeNode) -> None:
    fake_node.answer("GET", "/apps/ghost", 404, {"error": "no app named ghost", "id": "a1b2c3d4"})
    fake_node.answer(
        "POST",
        "/apps/demo/deploys",
        409,
        {"error": "a deploy of demo is in progress", "id": "e5f6a7b8"},
    )
    fake_node.answer(
        "POST",
        "/apps/demo/rollback",
        422,
        {
            "error": "invalid request",
            "id": "0badf00d",
            "fields": [{"loc": ["version"], "msg": "must be >= 1"}],
        },
    )
    async with NodeClient(fake_node.url, "dy_token") as client:
        with pytest.raises(NodeError) as caught:
            await client.get_app("ghost")
        assert str(caught.value) == "no app named ghost (error id a1b2c3d4)"
        assert (caught.value.status, caught.value.error_id) == (404, "a1b2c3d4")
        with pytest.raises(NodeError, match=r"in progress \(error id e5f6a7b8\)") as caught:
            await client.begin_deploy("demo")
        assert caught.value.status == 409
        with pytest.raises(NodeError, match=r"version: must be >= 1 \(error id 0badf00d\)"):
            await client.rollback("demo", 0)
    assert fake_node.auth == ["Bearer dy_token"] * 3
    rollback = json.loads(fake_node.bodies[("POST", "/api/v1/apps/demo/rollback")])
    assert rollback == {"version": 0, "rollout": "gradual"}


async def test_client_401_says_to_log_in(fake_node: FakeNode) -> None:
    fake_node.answer("GET", "/node", 401, {"error": "invalid token", "id": "11112222"})
    async with NodeClient(fake_node.url, "dy_wrong") as client:
        with pytest.raises(NodeError) as caught:
            await client.node()
    message = str(caught.value)
    assert message.startswith(f"token rejected: run `dockyard login {fake_node.url}`")
    assert "11112222" in message and "dy_wrong" not in message


async def test_client_quotes_names_into_one_path_segment(fake_node: FakeNode) -> None:
    fake_node.answer("DELETE", "/apps/demo/secrets/A%2F..%2Fb", 204)
    async with NodeClient(fake_node.url, "t") as client:
        await client.delete_secret("demo", "A/../b")
    assert fake_node.calls == [("DELETE", "/api/v1/apps/demo/secrets/A%2F..%2Fb")]


async def test_client_says_when_no_node_answers() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on `port` now: the connection is refused.
    async with NodeClient(f"http://127.0.0.1:{port}", "t") as client:
        with pytest.raises(
            NodeError, match=rf"cannot reach the Dockyard node at http://127.0.0.1:{port}"
        ):
            await client.list_apps()


async def test_client_refuses_an_answer_that_is_not_the_api(fake_node: FakeNode) -> None:
    fake_node.answer("GET", "/apps", 200, "<html>a web server</html>")
    async with NodeClient(fake_node.url, "t") as client:
        with pytest.raises(NodeError, match="not JSON"):
            await client.list_apps()


# -- the CLI, as a process ------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def dockyard(
    *args: str, env: dict[str, str], stdin: bytes = b"", cwd: Path | None = None
) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dockyard",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=120)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def cli_env(node: FakeNode, home: Path, token: str = "dy_test") -> dict[str, str]:
    return {"DOCKYARD_SERVER": node.url, "DOCKYARD_TOKEN": token, "XDG_CONFIG_HOME": str(home)}


@pytest.mark.slow  # three CLI processes
async def test_login_checks_the_token_and_stores_it_private(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DOCKYARD_SERVER": "", "DOCKYARD_TOKEN": ""}
    stored = tmp_path / "xdg" / "dockyard" / "credentials.json"
    fake_node.routes[("GET", "/api/v1/node")] = lambda request, _b: (
        (200, {"name": "node-1"})
        if request.headers.get("Authorization") == "Bearer dy_good"
        else (401, {"error": "invalid token", "id": "cafe0001"})
    )
    bad = await dockyard("login", fake_node.url, env=env, stdin=b"dy_bad\n")
    assert bad.code == 1
    assert "token rejected" in bad.stderr and "cafe0001" in bad.stderr
    assert not stored.exists()
    good = await dockyard("login", fake_node.url + "/", env=env, stdin=b"dy_good\n")
    assert good.code == 0, good.stderr
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert json.loads(stored.read_text()) == {"server": fake_node.url, "token": "dy_good"}
    assert "dy_good" not in good.stdout + good.stderr
    # The stored credentials are what the next command uses.
    fake_node.answer("GET", "/apps", 200, [{"name": "demo", "active_version": 3}])
    listed = await dockyard("apps", "list", "--json", env=env)
    assert listed.code == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"name": "demo", "active_version": 3}]
    assert fake_node.auth[-1] == "Bearer dy_good"


async def test_deploy_of_a_worker_uploads_the_bundle_and_finishes(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", name="demo")
    deploys = "/apps/demo/deploys"
    fake_node.answer(
        "POST", deploys, 201, {"deploy_id": "d1", "registry": "127.0.0.1:1", "repositories": {}}
    )
    fake_node.answer("PUT", f"{deploys}/d1/bundle", 200, {"bundle_hash": "x", "size": 1})
    fake_node.answer(
        "POST",
        f"{deploys}/d1/finish",
        201,
        {"version": {"number": 4}, "changes": ["worker code changed"], "rollout": None},
    )
    result = await dockyard(
        "deploy", str(project), "--containers-rollout", "immediate", "-m", "first",
        "--json", env=cli_env(fake_node, tmp_path),
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "Version 4" in result.stderr and "worker code changed" in result.stderr
    assert json.loads(result.stdout)["version"] == {"number": 4}
    assert fake_node.calls == [
        ("POST", f"/api/v1{deploys}"),
        ("PUT", f"/api/v1{deploys}/d1/bundle"),
        ("POST", f"/api/v1{deploys}/d1/finish"),
    ]
    uploaded = fake_node.bodies[("PUT", f"/api/v1{deploys}/d1/bundle")]
    assert uploaded == pack(project, load_config(project))[0]
    finish = json.loads(fake_node.bodies[("POST", f"/api/v1{deploys}/d1/finish")])
    assert finish == {"images": {}, "rollout": "immediate", "message": "first"}


async def test_deploy_racing_another_says_so_and_changes_nothing(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", name="demo")
    fake_node.answer(
        "POST", "/apps/demo/deploys", 409, {"error": "deploy in progress", "id": "0409aaaa"}
    )
    result = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert result.code == 1
    assert "another deploy of demo is in progress" in result.stderr
    assert fake_node.calls == [("POST", "/api/v1/apps/demo/deploys")]


async def test_deploy_shows_config_errors_with_file_and_line(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p")
    text = (project / "wrangler.jsonc").read_text().replace('"src/worker.py"', "42")
    (project / "wrangler.jsonc").write_text(text)
    result = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert result.code == 2
    assert "wrangler.jsonc:3: main: expected a string, got 42" in result.stderr
    assert fake_node.calls == []


async def test_deploy_refused_at_finish_aborts_and_shows_why(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "p", name="demo")
    deploys = "/apps/demo/deploys"
    fake_node.answer(
        "POST", deploys, 201, {"deploy_id": "d2", "registry": "127.0.0.1:1", "repositories": {}}
    )
    fake_node.answer("PUT", f"{deploys}/d2/bundle", 200, {"bundle_hash": "x", "size": 1})
    error = {"error": "wrangler.jsonc:2: name: [bold]x[/] bad", "id": "42424242"}
    fake_node.answer("POST", f"{deploys}/d2/finish", 422, error)
    fake_node.answer("DELETE", f"{deploys}/d2", 204)
    result = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert result.code == 1
    # The node's text arrives as it is (markup in it is not interpreted).
    assert "wrangler.jsonc:2: name: [bold]x[/] bad (error id 42424242)" in result.stderr
    assert "Deploy of demo aborted: the node is unchanged" in result.stderr
    assert fake_node.calls[-1] == ("DELETE", f"/api/v1{deploys}/d2")


@pytest.mark.slow  # three CLI processes
async def test_secret_put_reads_stdin_and_token_rotate_keeps_the_login(
    fake_node: FakeNode, tmp_path: Path
) -> None:
    home = tmp_path / "xdg"
    save_path = home / "dockyard" / "credentials.json"
    env = {"XDG_CONFIG_HOME": str(home), "DOCKYARD_SERVER": "", "DOCKYARD_TOKEN": ""}
    fake_node.answer("GET", "/node", 200, {"name": "n"})
    assert (await dockyard("login", fake_node.url, env=env, stdin=b"dy_old")).code == 0
    fake_node.answer("PUT", "/apps/demo/secrets/API_KEY", 200, {"name": "API_KEY"})
    put = await dockyard(
        "secret", "put", "API_KEY", "--app", "demo", env=env, stdin=b"s3cr3t-value\n"
    )
    assert put.code == 0, put.stderr
    body = json.loads(fake_node.bodies[("PUT", "/api/v1/apps/demo/secrets/API_KEY")])
    assert body == {"value": "s3cr3t-value"}
    assert "s3cr3t" not in put.stdout + put.stderr
    fake_node.answer("POST", "/tokens/rotate", 200, {"token": "dy_new"})
    rotated = await dockyard("token", "rotate", env=env)
    assert rotated.code == 0, rotated.stderr
    assert rotated.stdout.strip() == "dy_new"
    assert json.loads(save_path.read_text())["token"] == "dy_new"
    assert stat.S_IMODE(save_path.stat().st_mode) == 0o600
    assert fake_node.auth[-1] == "Bearer dy_old"


@pytest.mark.docker
async def test_deploy_with_a_broken_dockerfile_aborts(
    fake_node: FakeNode, tmp_path: Path, busybox_image: str, test_labels: dict[str, str]
) -> None:
    app = test_labels["dockyard.app"]
    marker = f"broken-step-{secrets.token_hex(3)}"
    project = make_project(
        tmp_path / "p",
        name=app,
        container=f"FROM {busybox_image}\nRUN echo {marker} && exit 7\n",
    )
    deploys = f"/apps/{app}/deploys"
    fake_node.answer(
        "POST",
        deploys,
        201,
        {"deploy_id": "d9", "registry": "127.0.0.1:1", "repositories": {"Web": f"{app}/web"}},
    )
    fake_node.answer("DELETE", f"{deploys}/d9", 204)
    result = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert result.code == 1, result.stderr
    assert "failed" in result.stderr and marker in result.stderr
    assert "returned a non-zero code: 7" in result.stderr
    assert f"Deploy of {app} aborted" in result.stderr
    assert fake_node.calls == [("POST", f"/api/v1{deploys}"), ("DELETE", f"/api/v1{deploys}/d9")]


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    """Debian's docker-registry on loopback, no auth: what the node's registry proxies to."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: {address}\nlog:\n  level: error\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/docker-registry",
        "serve",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"http://{address}/v2/") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(ready)
        yield address
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.docker
@pytest.mark.slow
async def test_deploy_builds_pushes_and_follows_the_rollout(
    fake_node: FakeNode,
    tmp_path: Path,
    busybox_image: str,
    test_labels: dict[str, str],
    registry: str,
    docker_runtime: DockerRuntime,
) -> None:
    app = test_labels["dockyard.app"]
    project = make_project(
        tmp_path / "p",
        name=app,
        container=f"FROM {busybox_image}\nRUN echo {secrets.token_hex(4)} > /id\n",
    )
    deploys = f"/apps/{app}/deploys"
    fake_node.answer(
        "POST",
        deploys,
        201,
        {"deploy_id": "d1", "registry": registry, "repositories": {"Web": f"{app}/web"}},
    )
    fake_node.answer("PUT", f"{deploys}/d1/bundle", 200, {"bundle_hash": "x", "size": 1})
    rollout = {"app": app, "version": 2, "state": "running", "steps": [50, 100], "step": 0}
    fake_node.answer(
        "POST",
        f"{deploys}/d1/finish",
        201,
        {
            "version": {"number": 2},
            "changes": ["image of Web changed"],
            "rollout": rollout | {"replaced": [], "total": 2},
        },
    )
    # The node's view of the rollout, one answer per poll: a step, then done.
    progress = iter(
        [
            rollout | {"step": 1, "replaced": ["Web/a"], "total": 2},
            rollout | {"step": 1, "replaced": ["Web/a", "Web/b"], "total": 2, "state": "done"},
        ]
    )
    fake_node.routes[("GET", f"/api/v1/apps/{app}/rollout")] = lambda _r, _b: (200, next(progress))
    result = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert result.code == 0, result.stderr
    assert json.loads(fake_node.bodies[("POST", f"/api/v1{deploys}")]) == {"classes": ["Web"]}
    finish = json.loads(fake_node.bodies[("POST", f"/api/v1{deploys}/d1/finish")])
    digest = finish["images"]["Web"]
    assert digest.startswith("sha256:") and finish["rollout"] == "gradual"
    # The registry holds exactly that manifest, under the deploy's tag.
    async with (
        aiohttp.ClientSession() as session,
        session.head(
            f"http://{registry}/v2/{app}/web/manifests/d1",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        ) as response,
    ):
        assert response.headers["Docker-Content-Digest"] == digest
    assert "Rollout of version 2 done" in result.stderr
    # The per-deploy name served the push only: it is not left on the deployer's engine.
    assert await docker_runtime.image_id(f"{registry}/{app}/web:d1") is None
    assert fake_node.calls[-2:] == [("GET", f"/api/v1/apps/{app}/rollout")] * 2
    # A second deploy of the same code pushes nothing new: every layer is skipped.
    fake_node.routes[("GET", f"/api/v1/apps/{app}/rollout")] = lambda _r, _b: (
        200,
        rollout | {"state": "done", "replaced": ["Web/a", "Web/b"], "total": 2},
    )
    again = await dockyard("deploy", str(project), env=cli_env(fake_node, tmp_path))
    assert again.code == 0, again.stderr
    assert "skipped (on the node)" in again.stderr
    assert json.loads(fake_node.bodies[("POST", f"/api/v1{deploys}/d1/finish")])["images"] == {
        "Web": digest
    }


@pytest.mark.docker
@pytest.mark.slow
async def test_deploy_interrupted_mid_build_aborts(
    fake_node: FakeNode, tmp_path: Path, busybox_image: str, test_labels: dict[str, str]
) -> None:
    app = test_labels["dockyard.app"]
    marker = f"slow-step-{secrets.token_hex(3)}"
    project = make_project(
        tmp_path / "p",
        name=app,
        container=f"FROM {busybox_image}\nRUN echo {marker} && sleep 60\n",
    )
    deploys = f"/apps/{app}/deploys"
    fake_node.answer(
        "POST", deploys, 201, {"deploy_id": "d5", "registry": "127.0.0.1:1", "repositories": {}}
    )
    fake_node.answer("DELETE", f"{deploys}/d5", 204)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dockyard", "deploy", str(project),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **cli_env(fake_node, tmp_path)},
        preexec_fn=_as_from_a_terminal,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = rest = b""
    signals = ""
    try:
        # The step's own output (not its "Step 2/2 : RUN ..." line) says it runs: Ctrl-C.
        while not seen.rstrip().endswith(b"| " + marker.encode()):
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
            assert line, seen.decode()
            seen += line
        signals = _signal_state(proc.pid)  # for the failure message
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):  # a failure shows what the deploy printed
            while line := await proc.stderr.readline():
                rest += line
    except TimeoutError:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        printed = (seen + rest).decode()
        raise AssertionError(
            f"deploy did not end after SIGINT ({signals}); it printed:\n{printed}"
        ) from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # a deploy that did not stop is not left behind
        await proc.wait()
        raise
    assert await proc.wait() == 130, (seen + rest).decode()
    assert f"Deploy of {app} aborted" in rest.decode()
    assert fake_node.calls == [("POST", f"/api/v1{deploys}"), ("DELETE", f"/api/v1{deploys}/d5")]


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT as a shell gives a foreground command (default
    action, not blocked), whatever the test process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _signal_state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        return f"no status: {exc}"
    return ", ".join(line for line in status.splitlines() if line.startswith("Sig"))


# -- remote `containers` (called by cli/containers.py when a node is configured) -----------


@pytest.fixture
def threaded_node() -> Iterator[FakeNode]:
    """A FakeNode on its own loop in a thread, for the CLI functions that run their own."""
    node = FakeNode()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    runner: list[web.AppRunner] = []

    async def start() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", node.handle)
        runner.append(web.AppRunner(app, access_log=None))
        await runner[0].setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner[0], sock).start()
        node.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        ready.set()

    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    try:
        yield node
    finally:
        asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


CONTAINERS = [
    {"id": "aaaa1111" + "0" * 56, "name": "c1", "class_name": "Web", "object_id": "f00d" * 16,
     "status": "running", "image": "i", "version": "v"},
    {"id": "aaaa2222" + "0" * 56, "name": "c2", "class_name": "Web", "object_id": "beef" * 16,
     "status": "running", "image": "i", "version": "v"},
]  # fmt: skip


def test_remote_containers_find_by_prefix_and_run(
    threaded_node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    from dockyard.cli.platform import (
        remote_containers_exec,
        remote_containers_list,
        remote_containers_logs,
    )

    threaded_node.answer("GET", "/apps/demo/containers", 200, {"containers": CONTAINERS})
    second = CONTAINERS[1]["id"]
    ran = {"exit_code": 3, "stdout": "out\n", "stderr": "e"}
    threaded_node.answer("POST", f"/containers/{second}/exec", 200, ran)
    threaded_node.answer("GET", f"/containers/{second}/logs", 200, {"lines": ["one", "two"]})

    assert remote_containers_list(NodeClient(threaded_node.url, "t"), "demo", as_json=True) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == [c["id"] for c in CONTAINERS]
    # An object id prefix picks one container; its command's exit code is the result.
    assert remote_containers_exec(NodeClient(threaded_node.url, "t"), "demo", "beef", ["ls"]) == 3
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("out\n", "e")
    body = json.loads(threaded_node.bodies[("POST", f"/api/v1/containers/{second}/exec")])
    assert body == {"cmd": ["ls"]}
    assert remote_containers_logs(NodeClient(threaded_node.url, "t"), "demo", "c2") == 0
    assert capsys.readouterr().out == "one\ntwo\n"
    # A prefix both containers share is refused, and nothing is run.
    calls = len(threaded_node.calls)
    assert remote_containers_exec(NodeClient(threaded_node.url, "t"), "demo", "aaaa", ["ls"]) == 1
    assert "'aaaa' matches 2 containers" in capsys.readouterr().err
    assert threaded_node.calls[calls:] == [("GET", "/api/v1/apps/demo/containers")]
