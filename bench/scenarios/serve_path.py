"""The serve path: a real ``dockyard serve`` against nginx and ``dockyard dev``, one run.

``python -m bench.scenarios.serve_path [--quick]``. The bench app is deployed to a node
(``dockyard serve`` on loopback, a data folder of its own under /tmp); the same warm
object is then measured with wrk through the node (router, connection handed to the app
process, worker, object, container), through ``dockyard dev`` on the same app, through
nginx in front of the node's container and straight to that container, the four paths
alternating at each connection level so machine drift hits all of them. Then two deploy
timings: a worker-only change (``dockyard deploy`` started → the new answer seen) and an
image change rolled out over 10 running instances (deploy started → rollout done).

Everything listens on 127.0.0.1; every load is bounded; the node is stopped with SIGTERM
(it stops its containers) and anything left with the node's owner label is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from ..machine import describe_machine, load_average
from ..processes import DevServer, Nginx
from ..wrk import WrkResult, parse_wrk

APP = Path(__file__).resolve().parents[1] / "app"
READY = re.compile(r"Ready apps on http://([\d.]+):(\d+) .* on http://([\d.]+):(\d+)")
HOST = "dockyard-bench.localhost"


async def wrk(url: str, connections: int, seconds: int, host: str | None = None) -> WrkResult:
    argv = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s"]
    argv += ["--timeout", "5s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    return parse_wrk(out.decode(errors="replace"))


class Serve:
    def __init__(self, base: Path) -> None:
        self.data = base / "data"
        self.log = base / "serve.log"
        self.token = "dy_" + secrets.token_urlsafe(32)
        self.proc: asyncio.subprocess.Process | None = None
        self.app_url = self.admin_url = ""

    async def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        env["DOCKYARD_ADMIN_TOKEN"] = self.token
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dockyard", "serve", "--data", str(self.data),
                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (match := READY.search(self.log.read_text(errors="replace"))):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("dockyard serve did not start:\n" + self.log.read_text())
            await asyncio.sleep(0.1)
        self.app_url = f"http://{match.group(1)}:{match.group(2)}"
        self.admin_url = f"http://{match.group(3)}:{match.group(4)}"

    async def deploy(self, project: Path, *args: str) -> float:
        env = {**os.environ, "DOCKYARD_SERVER": self.admin_url, "DOCKYARD_TOKEN": self.token}
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dockyard", "deploy", str(project), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
        if proc.returncode != 0:
            raise RuntimeError("dockyard deploy failed:\n" + out.decode(errors="replace"))
        return time.perf_counter() - started

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 120)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        db = self.data / "node.db"
        if db.exists():
            with sqlite3.connect(db) as conn:
                row = conn.execute("select value from meta where key = 'owner'").fetchone()
            if row:
                await _remove_by_label(f"dockyard.owner={row[0]}")


async def _remove_by_label(label: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "docker", "ps", "-aq", "--filter", f"label={label}", stdout=asyncio.subprocess.PIPE
    )
    ids = (await proc.communicate())[0].decode().split()
    if ids:
        rm = await asyncio.create_subprocess_exec(
            "docker", "rm", "-f", *ids, stdout=asyncio.subprocess.DEVNULL
        )
        await rm.wait()


async def container_port(owner_label: str, object_name: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "docker", "ps", "-q", "--filter", f"label={owner_label}",
        "--filter", f"label=dockyard.object_name={object_name}", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    ids = (await proc.communicate())[0].decode().split()
    if len(ids) != 1:
        raise RuntimeError(f"expected one container for {object_name}, found {ids}")
    port = await asyncio.create_subprocess_exec(
        "docker", "port", ids[0], "8080/tcp", stdout=asyncio.subprocess.PIPE
    )
    text = (await port.communicate())[0].decode()
    return int(text.strip().splitlines()[0].rsplit(":", 1)[1])


async def get(session: aiohttp.ClientSession, url: str, host: str | None = None) -> str:
    headers = {"Host": host} if host else {}
    async with session.get(url, headers=headers) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {body[:200]}")
        return body


def _prepare() -> tuple[Path, Path]:
    base = Path(tempfile.mkdtemp(prefix="dockyard-bench-serve-"))
    base.chmod(0o711)  # app processes run as their own uids and must reach their folders
    shutil.copytree(APP, base / "app")
    return base, base / "app"


async def main(quick: bool) -> int:
    seconds = 5 if quick else 10
    base, project = _prepare()
    node = Serve(base)
    dev = DevServer(project, base / "dev.log", "--no-access-log")
    nginx: Nginx | None = None
    rows: list[tuple[int, str, WrkResult]] = []
    timings: dict[str, float] = {}
    try:
        await node.start()
        timings["first deploy (build, push, version 1), s"] = await node.deploy(project)
        owner = (
            sqlite3.connect(node.data / "node.db")
            .execute("select value from meta where key = 'owner'")
            .fetchone()[0]
        )
        async with aiohttp.ClientSession() as session:
            await get(session, node.app_url + "/web/warm", HOST)
            port = await container_port(f"dockyard.owner={owner}", "warm")
            nginx = Nginx(port, base / "nginx")
            nginx_port = await nginx.start()
            dev_url = await dev.start()
            await get(session, dev_url + "/web/warm")
        urls = {
            "direct": (f"http://127.0.0.1:{port}/", None),
            "nginx": (f"http://127.0.0.1:{nginx_port}/", None),
            "dev": (f"{dev_url}/web/warm", None),
            "serve": (f"{node.app_url}/web/warm", HOST),
        }
        for url, host in urls.values():
            await wrk(url, 16, 2, host)
        for connections in (16, 64):
            for path, (url, host) in urls.items():
                result = await wrk(url, connections, seconds, host)
                rows.append((connections, path, result))
                print(
                    f"{connections:>3} conns {path:<7} {result.requests_per_s:>9,.0f} req/s "
                    f"p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms"
                    + (f" {result.errors} errors" if result.errors else ""),
                    flush=True,
                )
        await dev.stop()

        # A worker-only change: deploy started -> the new answer seen through the node.
        worker = project / "worker.py"
        worker.write_text(
            worker.read_text().replace('Response("ok\\n")', 'Response("ok v2\\n")', 1)
        )
        started = time.perf_counter()
        timings["worker-only deploy command, s"] = await node.deploy(project)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while await get(session, node.app_url + "/plain/p", HOST) != "ok v2\n":
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker-only change was never served")
                await asyncio.sleep(0.02)
        timings["worker-only change: deploy started -> served, s"] = time.perf_counter() - started

        # An image change over 10 running instances, replaced all at once.
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(get(session, f"{node.app_url}/web/r{i}", HOST) for i in range(10))
            )
        dockerfile = project / "container" / "Dockerfile"
        dockerfile.write_text(dockerfile.read_text() + f'\nENV BENCH_REV="{time.time()}"\n')
        timings["image change over 10 (+1) instances, deploy + rollout, s"] = await node.deploy(
            project, "--containers-rollout", "immediate"
        )
    finally:
        if nginx is not None:
            await nginx.stop()
        await dev.stop()
        await node.stop()
        shutil.rmtree(base, ignore_errors=True)

    machine = describe_machine()
    print(json.dumps({"machine": machine, "load average": load_average()}, indent=1))
    by = {(c, p): r.requests_per_s for c, p, r in rows}
    for connections in (16, 64):
        serve = by[(connections, "serve")]
        print(
            f"{connections} connections: serve {serve:,.0f} req/s = "
            f"{serve / by[(connections, 'nginx')]:.2f}x nginx, "
            f"{serve / by[(connections, 'dev')]:.2f}x dev, "
            f"{serve / by[(connections, 'direct')]:.2f}x direct"
        )
    for what, value in timings.items():
        print(f"{what}: {value:.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.serve_path")
    parser.add_argument("--quick", action="store_true")
    sys.exit(asyncio.run(main(parser.parse_args().quick)))
