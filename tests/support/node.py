"""A real ``dockyard serve`` for end-to-end tests: a subprocess on ephemeral ports with
a known admin token, its output captured, and the CLI run against it as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.engine import app_name
from tests.support.output import Output

DOCKYARD = [sys.executable, "-m", "dockyard"]
READY = re.compile(r"Ready apps on http://([\d.]+):(\d+) .* on http://([\d.]+):(\d+)")


class Node:
    """``dockyard serve`` on ephemeral ports with a known admin token."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.token = "dy_" + secrets.token_urlsafe(32)
        self.proc: subprocess.Popen[str] | None = None
        self._output: Output | None = None
        self.app_url = ""
        self.admin_url = ""

    def start(self, timeout: float = 60.0) -> Node:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
        env["DOCKYARD_ADMIN_TOKEN"] = self.token
        self.proc = subprocess.Popen(
            [
                *DOCKYARD,
                "serve",
                "--data",
                str(self.data),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._output = Output(self.proc)
        match = self.wait_for(READY, timeout)
        self.app_url = f"http://{match.group(1)}:{match.group(2)}"
        self.admin_url = f"http://{match.group(3)}:{match.group(4)}"
        return self

    @property
    def lines(self) -> list[str]:
        return self._output.lines if self._output is not None else []

    @property
    def output(self) -> str:
        return self._output.text if self._output is not None else ""

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        assert self._output is not None, "not started"
        return self._output.wait_for(
            pattern.search, timeout, f"serve never printed {pattern.pattern!r}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not exit after signal {sig}:\n{self.output}") from None
        finally:
            assert self._output is not None
            self._output.close()

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 300.0, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
        env["DOCKYARD_SERVER"] = self.admin_url
        env["DOCKYARD_TOKEN"] = self.token if token is None else token
        env["XDG_CONFIG_HOME"] = str(self.data.parent / "config")
        return subprocess.run(
            [*DOCKYARD, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    def deploy(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``dockyard deploy``, which must succeed (the node's log shows why not)."""
        done = self.cli("deploy", *args)
        assert done.returncode == 0, done.stdout + done.stderr + "\nnode:\n" + self.output[-5000:]
        return done

    def api(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        return asyncio.run(self._api(method, path, token, **kwargs))

    async def _api(self, method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.admin_url + "/api/v1" + path, headers=headers, **kwargs
            ) as response,
        ):
            body = await response.text()
            return response.status, (json.loads(body) if body.startswith(("{", "[")) else body)


@contextmanager
def running_node() -> Iterator[Node]:
    """A started node in a data folder of its own, stopped and cleaned up after."""
    # Apps run as their own uids when the node is root: the data folder must be reachable
    # by them, which pytest's tmp_path (inside a 0700 folder) is not.
    base = Path(tempfile.mkdtemp(prefix="dockyard-e2e-"))
    base.chmod(0o711)
    running = Node(base / "data")
    try:
        running.start()
        yield running
    finally:
        if running.proc is not None and running.proc.poll() is None:
            running.stop()
        remove_owned(base / "data")
        shutil.rmtree(base, ignore_errors=True)


def remove_owned(data: Path) -> None:
    """Whatever containers this node's owner label still has (a failed test)."""
    import sqlite3

    db = data / "node.db"
    if not db.exists():
        return
    with sqlite3.connect(db) as conn:
        row = conn.execute("select value from meta where key = 'owner'").fetchone()
    if row is None:
        return
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=dockyard.owner={row[0]}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)


def room_app(tmp_path: Path, cmd: str, *, before_fetch: str = "") -> Path:
    """An app of one container class, Web (busybox serving "hi" on 8080, started with the
    Dockerfile ``CMD`` given), whose worker sends every request to object "room-1" after
    running ``before_fetch`` (lines of Python, indented for the fetch handler)."""
    name = app_name()
    root = tmp_path / name
    (root / "container").mkdir(parents=True)
    (root / "container" / "index.html").write_text("hi\n")
    (root / "container" / "Dockerfile").write_text(
        f"FROM dockyard/busybox:latest\nCOPY index.html /www/index.html\nEXPOSE 8080\nCMD {cmd}\n"
    )
    (root / "worker.py").write_text(
        "import logging\n"
        "from dockyard import Container, get_container\n\n\n"
        "class Web(Container):\n    default_port = 8080\n    sleep_after = '5m'\n\n\n"
        "async def fetch(request, env, ctx):\n"
        + before_fetch
        + "    return await get_container(env.WEB, 'room-1').fetch(request)\n"
    )
    (root / "wrangler.jsonc").write_text(
        json.dumps(
            {
                "name": name,
                "main": "worker.py",
                "compatibility_flags": ["python_workers"],
                "containers": [{"class_name": "Web", "image": "./container/Dockerfile"}],
                "durable_objects": {"bindings": [{"name": "WEB", "class_name": "Web"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web"]}],
            }
        )
    )
    return root
