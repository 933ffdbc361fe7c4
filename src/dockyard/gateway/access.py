"""The access log of ``dockyard dev``: a line per answered request, on the console.

``12:00:01 GET /path 200 (1.2 ms)``: the time, the method, the path (without the query,
which may carry tokens), the status and the time the worker took to answer. The path is
printed percent-encoded, as it came: decoded, a client's ``%0A`` or ``%1B`` would forge
console lines or send the terminal escape sequences.

The line does not go through ``logging``: a record made, formatted and emitted there cost
``dockyard dev`` a third of its requests per second at 16 connections (README,
"Performance"). This formats the line itself, makes the clock's ``HH:MM:SS`` once a
second, and writes it at once to ``sys.stderr``, where the console's other lines go, so
a traceback is printed before the line of the answer it became.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..http import Request, parsed_url

__all__ = ["AccessLog"]


class AccessLog:
    """Writes the line for each answer; ``stream`` defaults to ``sys.stderr`` as it is
    when the line is written."""

    __slots__ = ("_second", "_stamp", "_stream")

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._second = -1
        self._stamp = ""

    def answered(self, request: Request, status: int, seconds: float) -> None:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%H:%M:%S", time.localtime(second))
        path = parsed_url(request).raw_path
        line = f"{self._stamp} {request.method} {path} {status} ({seconds * 1000:.1f} ms)\n"
        try:
            (self._stream or sys.stderr).write(line)
        except (OSError, ValueError):
            pass  # the console is gone (a closed pipe or file): nobody to tell, keep serving
