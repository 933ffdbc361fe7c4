"""Run ``dockyard dev`` as a real subprocess and wait on what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.output import Output

READY = re.compile(r"Ready \S+ on http://([\d.]+):(\d+)")


class DevServer:
    """``dockyard dev PROJECT --port 0``; its console output is collected line by line."""

    def __init__(self, project: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.project = project
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._output: Output | None = None
        self.url = ""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "dockyard", "dev", str(self.project),
            "--port", "0", "--dashboard", "127.0.0.1:0", *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 120.0) -> DevServer:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        self._output = Output(self.proc)
        match = self.wait_for(READY, timeout)
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        return self

    @property
    def lines(self) -> list[str]:
        return self._output.lines if self._output is not None else []

    @property
    def output(self) -> str:
        return self._output.text if self._output is not None else ""

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until a printed line matches ``pattern``; fail with the output so far."""
        assert self._output is not None, "not started"
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self._output.wait_for(
            regex.search, timeout, f"dockyard dev never printed {regex.pattern!r}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"dockyard dev did not exit within {timeout}s of signal {sig}; output:\n"
                + self.output
            ) from None
        assert self._output is not None
        self._output.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def rss_kib(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.stop()
