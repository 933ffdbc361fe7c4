"""The files of object storage: private to the user, and only so many open at once.

State folders are made 0700 and database files 0600 (SQLite gives a database's ``-wal``
and ``-shm`` files the mode of the database file), so another local user can read no
object's data.

An open WAL database holds three file descriptors (the file, ``-wal``, ``-shm``), so a
host with thousands of live objects would run out of them. ``OpenFiles`` keeps at most
``limit`` databases open per process: when another opens, the least recently used
idle one is closed, and it reopens on its next use. A database inside a transaction is
never closed. Closing one checkpoints its WAL (a deferred cost of its writes, which
closing at eviction or shutdown would pay anyway).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

__all__ = [
    "DEFAULT_MAX_OPEN_FILES",
    "OpenFiles",
    "default_open_files",
    "private_dir",
    "private_file",
]

log = logging.getLogger("dockyard.objects")

# 1000 databases are 3000 descriptors, well under the usual hard limit (often 1M, at
# least 4096 once the soft limit is raised to it) with room left for sockets.
DEFAULT_MAX_OPEN_FILES = 1000


class Closable(Protocol):
    def release_idle(self) -> bool:
        """Close if no transaction is open; True if it closed."""
        ...


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if needed, and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def private_file(path: Path) -> None:
    """Make ``path`` exist as 0600 before SQLite opens it (and tighten older files)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


class OpenFiles:
    """The object databases a process keeps open, at most ``limit``, least recent first."""

    def __init__(self, limit: int = DEFAULT_MAX_OPEN_FILES) -> None:
        self.limit = limit
        self._open: OrderedDict[Closable, None] = OrderedDict()
        self._warned = False
        self.closed_idle = 0  # connections closed to stay under the limit

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, db: Closable) -> None:
        self._open[db] = None
        excess = len(self._open) - max(self.limit, 1)
        if excess <= 0:
            return
        if not self.closed_idle:
            log.info(
                "%d object databases are open (the limit): from now on the least recently "
                "used idle one is closed when another opens",
                self.limit,
            )
        for other in list(self._open):
            if excess <= 0:
                break
            if other is not db and other.release_idle():
                self.closed_idle += 1
                excess -= 1
        if excess > 0 and not self._warned:
            # Every other open database is inside a transaction right now.
            self._warned = True
            log.warning(
                "more than %d object databases are open and none is idle; "
                "raise the open-files limit if this persists",
                self.limit,
            )
        elif excess <= 0:
            self._warned = False

    def touch(self, db: Closable) -> None:
        self._open.move_to_end(db)

    def closed(self, db: Closable) -> None:
        self._open.pop(db, None)


default_open_files = OpenFiles()
