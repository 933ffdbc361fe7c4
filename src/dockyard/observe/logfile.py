"""Reading a container's log straight from the engine's json-file, across its rotations.

At 20,000 lines/s the engine's follow API cost the engine about 0.4 of a core and the
watcher a third of one to take apart (2-core EPYC, issue 13): the engine had already
written every line to a file, so a node beside a local engine reads that file instead.

The json-file driver writes one JSON object per line, ``{"log": "<text>\\n", "stream":
"stdout", "time": "<RFC 3339, up to 9 digits>Z"}``; a line over 16 KiB is cut into
objects whose ``log`` does not end in a newline, joined here up to `max_line_bytes`
(counted in characters; a longer line comes out in pieces of that size).
With ``max-file`` above 1 the engine rotates by renaming ``<path>`` to ``<path>.1`` (and
``.1`` to ``.2``...) and starting a new file; an open file keeps its inode through the
renames, so the reader finishes the file it has, then goes on with the one after it.

A `FilePosition` (inode, offset) says where to resume: the offset is always at the start
of a line not yet taken, and never past the first piece of a cut line not yet whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime

from .records import FilePosition

__all__ = ["FileLine", "JsonLogFile"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # bytes per read: a read and its parsing hold the loop ~5 ms
_ROTATED = 16  # how many rotated files (<path>.1 ...) are looked at, at most


@dataclass(frozen=True, slots=True)
class FileLine:
    time: float
    stream: str  # "stdout" or "stderr"
    text: str
    end: int  # where the file can be resumed once this line is stored


class JsonLogFile:
    """One container's json-file log. `read()` returns the whole lines written since the
    last call (none at the end of the file); `gone` turns True once the file and every
    file after it have been removed (the container was)."""

    def __init__(
        self, path: str, resume: FilePosition | None = None, *, max_line_bytes: int = 64 * 1024
    ) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self.gone = False
        self._resume = resume
        self._fd: int | None = None
        self._inode = 0
        self._offset = 0  # bytes of the open file taken as whole entries
        self._rest = b""  # an entry not yet ended by a newline
        # stream -> (offset of the line's first piece, its time, its text so far)
        self._partial: dict[str, tuple[int, float, str]] = {}
        self._seconds: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:SS" -> Unix seconds

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self) -> list[FileLine]:
        """The lines of at most one `READ_SIZE` read (empty: nothing new for now)."""
        if self._fd is None and not self._open():
            return []
        assert self._fd is not None
        data = os.read(self._fd, READ_SIZE)
        if not data:
            if os.fstat(self._fd).st_size < self._offset + len(self._rest):
                self._restart("was truncated")  # max-file 1: the engine empties the file
            else:
                self._next_file()
            return []
        return self._parse(data)

    # -- which file --------------------------------------------------------------------

    def _open(self) -> bool:
        resume, self._resume = self._resume, None
        if resume is not None:
            for name in (self.path, *self._rotated()):
                if _inode(name) == resume.inode:
                    return self._open_at(name, resume.offset)
            log.warning(
                "The log file of %s was rotated away since it was last read: lines "
                "printed in between are lost",
                resume.container_id[:12],
            )
            oldest = [name for name in self._rotated() if _inode(name)]
            if oldest:
                return self._open_at(oldest[-1], 0)
        return self._open_at(self.path, 0)

    def _open_at(self, name: str, offset: int) -> bool:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.gone = True
            return False
        inode = os.fstat(fd).st_ino
        if os.fstat(fd).st_size < offset:
            offset = 0  # not the file the position meant (truncated since)
        os.lseek(fd, offset, os.SEEK_SET)
        self._fd, self._inode, self._offset, self._rest = fd, inode, offset, b""
        self._partial.clear()
        self.gone = False
        return True

    def _rotated(self) -> list[str]:
        return [f"{self.path}.{n}" for n in range(1, _ROTATED + 1)]

    def _next_file(self) -> None:
        """At the end of the open file: if the engine has moved on to a newer one, open
        that (a rest without its newline is a line the engine never finished)."""
        order = [*reversed(self._rotated()), self.path]  # oldest first
        inodes = [_inode(name) for name in order]
        if self._inode not in inodes:
            if not any(inodes):
                self.close()
                self.gone = True
            elif inodes[-1] != 0 and all(n == 0 for n in inodes[:-1]):
                # A new file and no rotated ones: ours was removed, not rotated.
                self.close()
                self._open_at(self.path, 0)
            return
        after = inodes.index(self._inode) + 1
        for name, inode in zip(order[after:], inodes[after:], strict=True):
            if inode:
                self.close()
                self._open_at(name, 0)
                return

    def _restart(self, why: str) -> None:
        log.info("The log file %s %s: reading it from its start", self.path, why)
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._offset, self._rest = 0, b""
        self._partial.clear()

    # -- what is in it -----------------------------------------------------------------

    def _parse(self, data: bytes) -> list[FileLine]:
        buffer = self._rest + data if self._rest else data
        last = buffer.rfind(b"\n")
        if last < 0:
            self._rest = buffer
            return []
        self._rest = buffer[last + 1 :]
        lines: list[FileLine] = []
        offset = self._offset
        loads, partial, cap = json.loads, self._partial, self.max_line_bytes
        for raw in buffer[:last].split(b"\n"):
            start, offset = offset, offset + len(raw) + 1
            try:
                entry = loads(raw)
                text, stream, stamp = entry["log"], entry["stream"], entry["time"]
            except (ValueError, KeyError, TypeError):
                log.warning("Skipping an unreadable entry in %s at byte %d", self.path, start)
                continue
            at = self._time(stamp)
            if stream in partial:
                start, at, head = partial.pop(stream)
                text = head + text
            if not text.endswith("\n"):
                if len(text) < cap:
                    partial[stream] = (start, at, text)
                    continue
                while len(text) > cap:  # a line longer than any kept: in pieces
                    lines.append(FileLine(at, stream, text[:cap], self._resumable(offset)))
                    text = text[cap:]
                partial[stream] = (start, at, text)
                continue
            text = text[:-1]
            while len(text) > cap:
                lines.append(FileLine(at, stream, text[:cap], self._resumable(offset)))
                text = text[cap:]
            lines.append(FileLine(at, stream, text, self._resumable(offset)))
        self._offset = offset
        return lines

    def _resumable(self, offset: int) -> int:
        """Where to resume after a line ending at `offset`: never past a cut line's first
        piece still waiting for its end."""
        if not self._partial:
            return offset
        return min(offset, *(start for start, _, _ in self._partial.values()))

    def _time(self, stamp: str) -> float:
        whole = self._seconds.get(stamp[:19])
        if whole is None:
            if len(self._seconds) > 4096:
                self._seconds.clear()
            moment = datetime.fromisoformat(stamp[:19] + "+00:00")
            whole = self._seconds[stamp[:19]] = int(moment.timestamp())
        if stamp.endswith("Z"):
            fraction = stamp[19:-1]
            return whole + float("0" + fraction) if fraction[:1] == "." else float(whole)
        # Another zone (not what the engine writes today).
        text = re.sub(r"(\.\d{6})\d+", r"\1", stamp)
        return datetime.fromisoformat(text).timestamp()

    @property
    def inode(self) -> int:
        """The inode of the file the last lines came from."""
        return self._inode


def _inode(name: str) -> int:
    try:
        return os.stat(name).st_ino
    except OSError:
        return 0
