"""A subprocess's output, read line by line by a thread, and waited on by tests."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")


class Output:
    """Every line `stream` gives (without its newline) and when it came (monotonic)."""

    def __init__(self, proc: subprocess.Popen[str], stream: IO[str] | None = None) -> None:
        self.proc = proc
        self.stream = stream if stream is not None else proc.stdout
        assert self.stream is not None, "the process's output is not a pipe"
        self.lines: list[str] = []
        self.times: list[float] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.stream is not None
        for line in self.stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()
        with self._changed:  # the end: a waiter fails now, not at its deadline
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, match: Callable[[str], T | None], timeout: float, what: str) -> T:
        """The first line (from the start) for which `match` gives something; fails with
        the output so far once `timeout` passes or the output ends without one."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = match(line)
                    if found is not None and found is not False:
                        return found
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                ended = not self._reader.is_alive()
                if remaining <= 0 or ended:
                    raise AssertionError(
                        f"{what} (exit code {self.proc.poll()}); output:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        """After the process ended: the rest of its output read, the pipe closed."""
        self._reader.join(10)
        if self.stream is not None:
            self.stream.close()
