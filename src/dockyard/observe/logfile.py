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

import itertools
import json
import logging
import operator
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .records import FilePosition

__all__ = ["JsonLogFile", "LineRun"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # bytes per read: a read and its parsing hold the loop ~5 ms
_ROTATED = 16  # how many rotated files (<path>.1 ...) are looked at, at most


@dataclass(slots=True)
class LineRun:
    """Consecutive lines of one stream, with their times, and where the file can be
    resumed once they are stored."""

    stream: str  # "stdout" or "stderr"
    times: list[float]
    texts: list[str]
    end: int


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

    def read(self) -> list[LineRun]:
        """The lines of at most one `READ_SIZE` read, as runs of one stream each (empty:
        nothing new for now)."""
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
        if _inode(self.path) == self._inode:
            return  # still the engine's current file: one stat per idle look
        order = [*reversed(self._rotated()), self.path]  # oldest first
        inodes = [_inode(name) for name in order]
        if self._inode in inodes:
            after = inodes.index(self._inode) + 1
            later = zip(order[after:], inodes[after:], strict=True)
            following = [name for name, inode in later if inode]
        else:
            # Ours is gone: removed with the container, or rotated away while this reader
            # was behind by more than the engine keeps.
            following = [name for name, inode in zip(order, inodes, strict=True) if inode]
            if not following:
                self.close()
                self.gone = True
                return
            if len(following) > 1:
                log.warning(
                    "The log file %s was rotated away before it was read to its end: "
                    "lines printed in between are lost",
                    self.path,
                )
        if following:
            self.close()
            self._open_at(following[0], 0)

    def _restart(self, why: str) -> None:
        log.info("The log file %s %s: reading it from its start", self.path, why)
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._offset, self._rest = 0, b""
        self._partial.clear()

    # -- what is in it -----------------------------------------------------------------

    def _parse(self, data: bytes) -> list[LineRun]:
        buffer = self._rest + data if self._rest else data
        last = buffer.rfind(b"\n")
        if last < 0:
            self._rest = buffer
            return []
        self._rest = buffer[last + 1 :]
        raws = buffer[:last].split(b"\n")
        ends = list(itertools.accumulate((len(raw) + 1 for raw in raws), initial=self._offset))
        self._offset = ends[-1]
        try:
            # One parse for the whole read: entries never hold a raw newline (JSON escapes
            # it), so the lines joined by commas are one JSON array.
            entries = json.loads(b"[" + b",".join(raws) + b"]")
        except ValueError:
            entries = [_entry(raw) for raw in raws]
        if not self._partial:
            plain = self._plain(entries, ends)
            if plain is not None:
                return plain
        runs: list[LineRun] = []
        run: LineRun | None = None
        partial, cap, seconds = self._partial, self.max_line_bytes, self._seconds
        for index, entry in enumerate(entries):
            try:
                text, stream, stamp = entry["log"], entry["stream"], entry["time"]
                if not (isinstance(text, str) and isinstance(stamp, str)):
                    raise TypeError(text)
            except (KeyError, TypeError):
                log.warning("Skipping an unreadable entry in %s at byte %d", self.path, ends[index])
                continue
            whole = seconds.get(stamp[:19])
            if whole is not None and stamp[-1:] == "Z" and stamp[19:20] == ".":
                at = whole + float(stamp[19:-1])
            else:
                at = self._time(stamp)
            end = ends[index + 1]
            if partial or not text.endswith("\n") or len(text) > cap + 1:
                pieces = self._pieces(text, stream, at, ends[index])
                if not pieces:
                    continue
            else:
                pieces = [(at, text[:-1])]
            resume = self._resumable(end)
            for piece_at, piece in pieces:
                if run is None or run.stream != stream:
                    run = LineRun(stream, [], [], resume)
                    runs.append(run)
                run.times.append(piece_at)
                run.texts.append(piece)
                run.end = resume
        return runs

    def _plain(self, entries: list[Any], ends: list[int]) -> list[LineRun] | None:
        """The common case in a few passes over the read instead of a loop of many steps
        per line: every entry whole, no cut line pending, the engine's time format. None
        when the read is not that case (the general loop then takes it)."""
        try:
            logs = [entry["log"] for entry in entries]
            streams = [entry["stream"] for entry in entries]
            stamps = [entry["time"] for entry in entries]
            # Every line whole (the engine cuts none over 16 KiB), none over the cap; a
            # time in another format fails float() below.
            if not all(map(_ends_line, logs)) or max(map(len, logs)) > self.max_line_bytes + 1:
                return None
            seconds = self._seconds
            for key in {stamp[:19] for stamp in stamps} - seconds.keys():
                self._time(key + "Z")  # fills the cache
            times = [seconds[stamp[:19]] + float(stamp[19:-1]) for stamp in stamps]
        except (KeyError, TypeError, ValueError):
            return None
        texts = [text[:-1] for text in logs]
        if streams.count(streams[0]) == len(streams) and isinstance(streams[0], str):
            return [LineRun(streams[0], times, texts, ends[-1])]
        runs = []
        begin = 0
        for index in range(1, len(streams) + 1):
            if index < len(streams) and streams[index] == streams[begin]:
                continue
            stream = streams[begin]
            if not isinstance(stream, str):
                return None
            runs.append(LineRun(stream, times[begin:index], texts[begin:index], ends[index]))
            begin = index
        return runs

    def _pieces(self, text: str, stream: str, at: float, start: int) -> list[tuple[float, str]]:
        """A cut line's pieces: joined to what came before on its stream; kept back until
        its newline unless longer than the cap (then given out in pieces of the cap)."""
        partial, cap = self._partial, self.max_line_bytes
        if stream in partial:
            start, at, head = partial.pop(stream)
            text = head + text
        whole = text.endswith("\n")
        if whole:
            text = text[:-1]
        pieces = []
        while len(text) > cap:
            pieces.append((at, text[:cap]))
            text = text[cap:]
        if whole:
            pieces.append((at, text))
        else:
            partial[stream] = (start, at, text)
        return pieces

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


def _entry(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None  # reported as unreadable by the caller


_ends_line = operator.methodcaller("endswith", "\n")


def _inode(name: str) -> int:
    try:
        return os.stat(name).st_ino
    except OSError:
        return 0
