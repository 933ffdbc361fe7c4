"""Child processes the bench starts and always stops: ``dockyard dev`` and nginx."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

__all__ = ["DevServer", "Nginx", "free_port", "wait_listening"]

READY = re.compile(r"Ready \S+ on (http://[\d.]+:\d+)")
# Seconds dockyard dev gets to build its images and print Ready.
READY_WITHIN = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int) -> None:
    """Until 127.0.0.1:``port`` accepts a connection; bound it with a timeout."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
        else:
            writer.close()
            return


async def _terminate(proc: asyncio.subprocess.Process, sig: int, grace: float) -> int:
    """Signal ``proc`` and wait; SIGKILL if it outlives ``grace``. Returns its exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


class DevServer:
    """``dockyard dev PROJECT --port 0`` with its console written to ``log_path``.

    A file rather than a pipe: dockyard dev logs every request, and a reader that falls
    behind must never slow it down.
    """

    def __init__(self, project: Path, log_path: Path, *args: str) -> None:
        self.project = project
        self.log_path = log_path
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> str:
        """Start it and wait for its Ready line (image builds included)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "dockyard", "dev", str(self.project), "--port", "0", *self.args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + READY_WITHIN
        while True:
            match = READY.search(self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockyard dev did not get ready (exit code {self.proc.returncode}):\n"
                    + self.tail()
                )
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1))

    async def stop(self) -> int | None:
        """SIGTERM (dockyard dev then stops its containers), SIGKILL a minute later."""
        if self.proc is None:
            return None
        return await _terminate(self.proc, signal.SIGTERM, 60.0)


NGINX_CONF = """\
worker_processes 1;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream container {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://container;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class Nginx:
    """nginx with one worker as a keep-alive reverse proxy to ``127.0.0.1:upstream``."""

    def __init__(self, upstream: int, workdir: Path) -> None:
        self.upstream = upstream
        self.workdir = workdir
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The worker may run as nobody (when started by root); it must reach its temp paths.
        self.workdir.chmod(0o755)
        self.port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.workdir, upstream=self.upstream, port=self.port))
        self.proc = await asyncio.create_subprocess_exec(
            "nginx",
            *("-p", str(self.workdir), "-e", str(self.workdir / "error.log"), "-c", str(conf)),
            *("-g", f"daemon off; pid {self.workdir / 'nginx.pid'};"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(10):
                await wait_listening(self.port)
        except TimeoutError:
            await self.stop()
            log = (self.workdir / "error.log").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start:\n{log}") from None
        return self.port

    async def stop(self) -> None:
        if self.proc is not None:
            # SIGQUIT is nginx's graceful shutdown; its worker goes with the master.
            await _terminate(self.proc, signal.SIGQUIT, 10.0)
