"""Every timeout and size limit of the gateway, in one frozen dataclass.

The defaults follow nginx's where nginx has one (``client_header_timeout``,
``client_body_timeout``, ``send_timeout``, ``large_client_header_buffers``,
``keepalive_timeout``), so a client that works behind nginx works here. The node's
settings embed this object; nothing here imports from outside ``gateway/``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GatewayLimits"]


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """Timeouts in seconds, sizes in bytes."""

    # An idle keep-alive connection is closed after this long (nginx: 75 s).
    keep_alive_timeout: float = 75.0
    # A request's whole head must arrive within this time, else 408 (nginx: 60 s).
    header_timeout: float = 30.0
    # The longest pause between two pieces of a request body, else 408 and close
    # (nginx ``client_body_timeout``: 60 s). Pauses the worker causes do not count.
    body_timeout: float = 60.0
    # The longest a response write may wait for a client that does not read; then the
    # connection is aborted and the body's source closed (nginx ``send_timeout``: 60 s).
    write_timeout: float = 60.0
    # After a final error answer (400, 408, 414, 431), how long the client's further
    # bytes are read and dropped before closing, so that the close does not reset the
    # connection before the client has read the answer (nginx ``lingering_timeout``: 5 s).
    linger_timeout: float = 2.0
    # The request target (path and query); longer is 414 (nginx: one 8 KiB buffer).
    max_url: int = 8 * 1024
    # One header line, name and value; longer is 431 (nginx: 8 KiB).
    max_header_line: int = 8 * 1024
    # The whole head: request line and every header; longer is 431 (nginx: 4 x 8 KiB
    # buffers for the long lines plus 1 KiB; 64 KiB leaves room for big cookies).
    max_head: int = 64 * 1024
    # Header lines in one request; more is 431 (Apache's LimitRequestFields: 100).
    max_headers: int = 100
    # Requests parsed ahead of the one being answered; reading pauses beyond this.
    max_pipelined: int = 16
    # Request body bytes held for a worker that has not read them yet; reading from
    # the client pauses above this (and resumes below a quarter of it).
    max_body_buffer: int = 1024 * 1024
    # Open client connections; over it the oldest idle ones are closed first, and a new
    # connection is refused (closed at once) when none is idle.
    max_connections: int = 10_000
    # The listen socket's backlog (the kernel caps it at net.core.somaxconn).
    backlog: int = 1024
    # How long ``Gateway.stop()`` lets requests in flight finish before cancelling them.
    stop_grace: float = 5.0
    # The largest WebSocket message accepted from a client (Cloudflare: 32 MiB).
    websocket_max_message: int = 32 * 1024 * 1024
