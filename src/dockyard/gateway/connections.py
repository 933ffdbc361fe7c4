"""The gateway's open client connections, bounded: over the limit the oldest idle go first."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["Connection", "Connections", "warn_limit"]

log = logging.getLogger("dockyard.gateway")

# A limit hit by one abusive client can be hit thousands of times a second: say it once
# per this many seconds per kind, with how often it happened meanwhile.
_WARN_EVERY = 10.0
_warned: dict[str, tuple[float, int]] = {}


def warn_limit(kind: str, message: str) -> None:
    """Log that a limit was hit, at most once per ``_WARN_EVERY`` seconds per ``kind``."""
    now = time.monotonic()
    last, count = _warned.get(kind, (0.0, 0))
    if now - last >= _WARN_EVERY:
        _warned[kind] = (now, 0)
        suffix = f" ({count} more since the last report)" if count else ""
        log.warning("limit hit: %s%s", message, suffix)
    else:
        _warned[kind] = (last, count + 1)


class Connection(Protocol):
    @property
    def idle(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


class Connections(Generic[C]):
    """Open connections in the order they were opened."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Set by Gateway.stop(): answers in flight say "Connection: close".
        self.stopping = False
        # Connections answering a request now (HttpProtocol keeps it).
        self.answering = 0
        self._open: dict[C, None] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._open))

    def add(self, connection: C) -> bool:
        """Register ``connection``; False when the limit is reached and none is idle."""
        if len(self._open) >= self.limit and not self._make_room():
            warn_limit(
                "connections", f"{len(self._open)} connections open (max), refusing new ones"
            )
            return False
        self._open[connection] = None
        return True

    def discard(self, connection: C) -> None:
        self._open.pop(connection, None)

    def _make_room(self) -> bool:
        for connection in self._open:
            if connection.idle:
                del self._open[connection]
                connection.close()
                warn_limit(
                    "connections-idle",
                    f"{self.limit} connections open (max), closing the oldest idle ones",
                )
                return True
        return False
