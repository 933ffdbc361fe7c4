"""``LoopWatchdog``: notices an event loop that stopped turning, and a stop that cannot happen.

Everything in ``dockyard dev`` runs on one event loop, so a worker that computes for
five seconds without an ``await`` freezes every other request and Ctrl-C alike. The
watchdog is a thread beside the loop:

- the loop bumps a heartbeat every ``interval`` seconds; when the beat is late by more
  than ``stall_after`` seconds, the thread logs the loop thread's current stack (from
  ``sys._current_frames()``), naming the innermost frame of the user's code, once per
  stall, and logs again when the loop turns again;
- ``watch_signals`` chains a small handler in front of the loop's own SIGINT/SIGTERM
  handling. Python runs it between two bytecodes of the blocking code, so the thread
  learns of the signal even though the loop cannot act on it. If, ``signal_grace``
  seconds after the signal, the process still runs and its loop is stalled, the thread
  writes why to stderr and ends the process with ``os._exit(128 + signal)``.

A stuck loop cannot stop containers, so a forced exit leaves them running on purpose:
they carry this app's owner label, and the next ``dockyard dev`` of the folder adopts
or removes them at start, as after any crash. A loop blocked inside C code that never
returns to Python (no bytecode runs) does not see the signal; the engine's SIGKILL
from a supervisor (or a second terminal) is the answer to that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["LoopWatchdog"]

_log = logging.getLogger("dockyard.watchdog")


class LoopWatchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        stall_after: float = 1.0,
        interval: float = 0.1,
        signal_grace: float = 5.0,
        source_root: Path | str | None = None,
        stack_limit: int = 30,
        log: logging.Logger = _log,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.loop = loop
        self.stall_after = stall_after
        self.interval = interval
        self.signal_grace = signal_grace
        # Where the user's code lives: its innermost frame is the one a report names.
        self.source_root = str(Path(source_root).resolve()) if source_root else None
        self.stack_limit = stack_limit
        self.log = log
        self._exit = exit
        self._beat = time.monotonic()
        self._loop_thread: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._signal: tuple[int, float] | None = None
        self._previous: dict[int, Any] = {}
        self.stalls = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching; call it from the loop's thread while the loop runs."""
        if self._thread is not None:
            return
        self._loop_thread = threading.get_ident()
        self._stopping.clear()
        self._heartbeat()
        self._thread = threading.Thread(target=self._run, name="dockyard-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and give the signals back to whoever handled them before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join()

    def watch_signals(self, signums: Iterable[int]) -> None:
        """Learn of these signals even while the loop is stuck (main thread only).

        The handler already installed (the loop's own, from ``add_signal_handler``) keeps
        running first: the loop still hears of the signal as before."""
        for signum in signums:
            previous = signal.getsignal(signum)
            self._previous[signum] = previous

            def chained(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
                if callable(previous):
                    previous(sig, frame)
                self._signal = (sig, time.monotonic())

            signal.signal(signum, chained)

    # -- the loop's side ---------------------------------------------------------------------

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        self._timer = self.loop.call_later(self.interval, self._heartbeat)

    # -- the thread's side -------------------------------------------------------------------

    def _run(self) -> None:
        stalled_since: float | None = None
        while not self._stopping.wait(self.interval):
            now = time.monotonic()
            late = now - self._beat - self.interval
            if late >= self.stall_after:
                if stalled_since is None:
                    stalled_since = self._beat + self.interval
                    self.stalls += 1
                    self._report(late)
                if self._must_exit(now):
                    return
            elif stalled_since is not None:
                self.log.warning(
                    "The event loop runs again after being blocked for %.1f s",
                    self._beat - stalled_since,
                )
                stalled_since = None

    def _must_exit(self, now: float) -> bool:
        received = self._signal
        if received is None or now - received[1] < self.signal_grace:
            return False
        signum, _ = received
        name = signal.Signals(signum).name
        code = 128 + signum
        stack = "".join(self._stack()[0])
        message = (
            f"\ndockyard: {name} was not handled within {self.signal_grace:g} s: the event loop "
            f"is blocked by:\n{stack}"
            f"dockyard: exiting now with code {code}, without stopping containers; the next "
            "`dockyard dev` in this folder adopts or removes them.\n"
        )
        # Straight to the file descriptor: a stuck thread may hold the logging locks.
        try:
            os.write(sys.stderr.fileno(), message.encode("utf-8", "replace"))
        except (OSError, ValueError):
            pass
        self._exit(code)
        return True

    def _report(self, late: float) -> None:
        lines, where = self._stack()
        self.log.warning(
            "The event loop has been blocked for %.1f s%s; it is running:\n%s",
            late,
            f" at {where}" if where else "",
            "".join(lines).rstrip("\n"),
        )

    def _stack(self) -> tuple[list[str], str]:
        """The loop thread's stack (innermost last), and the user's innermost file:line."""
        frame = sys._current_frames().get(self._loop_thread or -1)
        if frame is None:
            return [], ""
        summary = traceback.extract_stack(frame)
        where = ""
        for entry in reversed(summary):
            if self.source_root is None or entry.filename.startswith(self.source_root + os.sep):
                where = f"{entry.filename}:{entry.lineno}"
                break
        if self.stack_limit > 0:
            summary = traceback.StackSummary.from_list(summary[-self.stack_limit :])
        return summary.format(), where
