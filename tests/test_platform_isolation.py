"""Isolation between apps on a real ``dockyard serve``: node files, sockets, crashes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.support.engine import app_name
from tests.test_platform_e2e import Node, get, node  # noqa: F401  (node is a fixture)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

WORKER = """
import json
import os
import socket
from urllib.parse import parse_qs, urlparse

from dockyard import DurableObject, Response


class Counter(DurableObject):
    async def fetch(self, request):
        n = (await self.ctx.storage.get("n") or 0) + 1
        await self.ctx.storage.put("n", n)
        return Response(str(n))


def attempt(action):
    try:
        action()
    except PermissionError:
        return "denied"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
    return "allowed"


def connect(path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)


async def fetch(request, env, ctx):
    url = urlparse(request.url)
    query = {k: v for k, v in parse_qs(url.query).items()}
    if url.path == "/crash":
        os._exit(3)
    if url.path == "/count":
        stub = env.COUNTER.get(env.COUNTER.id_from_name("one"))
        return await stub.fetch(request)
    if url.path == "/probe":
        out = {}
        for f in query.get("file", []):
            out["read " + f] = attempt(lambda f=f: open(f, "rb").read(1))
        for d in query.get("dir", []):
            out["list " + d] = attempt(lambda d=d: os.listdir(d))
        for s in query.get("sock", []):
            out["connect " + s] = attempt(lambda s=s: connect(s))
        return Response(json.dumps(out))
    return Response("answer")
"""


def worker_app(tmp_path: Path) -> tuple[str, Path]:
    name = app_name()
    root = tmp_path / name
    root.mkdir()
    (root / "worker.py").write_text(WORKER)
    config = {
        "name": name,
        "main": "worker.py",
        "durable_objects": {"bindings": [{"class_name": "Counter", "name": "COUNTER"}]},
        "migrations": [{"new_sqlite_classes": ["Counter"], "tag": "v1"}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config))
    return name, root


@pytest.mark.skipif(os.geteuid() != 0, reason="apps run as their own uids only under root")
def test_app_cannot_reach_node_files_or_other_app_sockets(node: Node, tmp_path: Path) -> None:  # noqa: F811
    a, a_dir = worker_app(tmp_path)
    b, b_dir = worker_app(tmp_path)
    node.deploy(str(a_dir))
    node.deploy(str(b_dir))
    assert asyncio.run(get(node, f"{b}.localhost", "/count")) == (200, "1")
    data = node.data
    files = [p for p in data.iterdir() if p.is_file()]
    assert data / "node.db" in files
    files += [p for p in (data / "apps" / b / "state").rglob("*") if p.is_file()]
    socks = [p for p in (data / "run" / b).rglob("*") if p.is_socket()]
    assert socks, "B's process has sockets under DATA/run/<b>/"
    query = "&".join(
        [f"file={f}" for f in files]
        + [f"dir={data}", f"dir={data / 'apps' / b / 'state'}"]
        + [f"sock={s}" for s in [*socks, Path("/var/run/docker.sock")]]
    )
    status, body = asyncio.run(get(node, f"{a}.localhost", "/probe?" + query))
    assert status == 200
    result = json.loads(body)
    print(json.dumps(result, indent=1))
    assert all(v in ("denied", "refused") for v in result.values()), result


def test_crashing_app_restarts_with_storage_and_other_app_unaffected(
    node: Node,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, a_dir = worker_app(tmp_path)
    b, b_dir = worker_app(tmp_path)
    node.deploy(str(a_dir))
    node.deploy(str(b_dir))
    assert asyncio.run(get(node, f"{a}.localhost", "/count")) == (200, "1")
    assert asyncio.run(get(node, f"{a}.localhost", "/count")) == (200, "2")

    async def crash_then_count() -> list[tuple[int, str]]:
        try:
            await get(node, f"{a}.localhost", "/crash")
        except Exception:  # the connection may simply drop
            pass
        b_answers = [await get(node, f"{b}.localhost", "/") for _ in range(20)]
        assert b_answers == [(200, "answer")] * 20
        for _ in range(300):  # A comes back after its back-off
            status, text = await get(node, f"{a}.localhost", "/count")
            if status == 200:
                return [(status, text)]
            await asyncio.sleep(0.1)
        return []

    assert asyncio.run(crash_then_count()) == [(200, "3")]
