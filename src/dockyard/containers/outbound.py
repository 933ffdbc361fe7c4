"""Egress control: the rules a Container class sets on its container's outbound HTTP,
and how a handler is called.

Rules (Cloudflare's semantics, ``@cloudflare/containers``), for an HTTP request to host H:

1. H matches ``denied_hosts``: blocked, whatever else says.
2. ``allowed_hosts`` is set (even empty) and H matches none of it: blocked.
3. ``outbound_by_host`` has H (exactly, else by pattern): that handler answers.
4. ``outbound`` (the catch-all handler) is set: it answers.
5. ``allowed_hosts`` is set (H matched it) or ``enable_internet``: forwarded.
6. Otherwise: blocked.

Patterns are globs where ``*`` matches any run of characters (``*.example.com``,
``api.*.internal``); hosts are compared lower-case without a trailing dot. A blocked
request gets ``BLOCKED_STATUS`` (520, as Cloudflare answers).

HTTPS. The container reaches HTTPS origins with ``CONNECT host:port``; the proxy sees the
host but not what is inside TLS, so a tunnel follows rules 1, 2 and 5 only: handlers never
see HTTPS requests (Cloudflare's ``interceptHttps``, which makes the container trust a CA
of the platform's, is not implemented).

The proxy that applies these rules is egress_proxy.py; the socket it listens on, inside
the container's own network namespace, comes from netns.py (or, on a node, from
egress_handoff.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..http import Request, Response

__all__ = [
    "BLOCKED_STATUS",
    "Decision",
    "EgressRules",
    "Handler",
    "call_handler",
    "glob_match",
    "proxy_env",
]

BLOCKED_STATUS = 520
# A method name of the Container class, or a callable taking (container, request) or
# (request); it returns a Response (or an awaitable of one).
Handler = str | Callable[..., Any]


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern``, where ``*`` stands for any run of characters
    (none included) and everything else must match exactly."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == value
    first, *middle, last = pieces
    if len(value) < len(first) + len(last):
        return False
    if not (value.startswith(first) and value.endswith(last)):
        return False
    at, end = len(first), len(value) - len(last)
    for piece in middle:
        found = value.find(piece, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _matches(host: str, patterns: tuple[str, ...]) -> bool:
    return any(glob_match(normalize_host(p), host) for p in patterns)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["block", "forward", "handle"]
    handler: Handler | None = None
    why: str = ""


@dataclass(frozen=True, slots=True)
class EgressRules:
    """What a Container class (and its runtime setters) say about outbound traffic."""

    enable_internet: bool = True
    # None: no allowlist. A tuple, even empty, allows only what matches it.
    allowed_hosts: tuple[str, ...] | None = None
    denied_hosts: tuple[str, ...] = ()
    outbound: Handler | None = None
    outbound_by_host: Mapping[str, Handler] = field(default_factory=dict)

    @property
    def needs_proxy(self) -> bool:
        """Whether anything beyond ``enable_internet`` is set: only then does the
        container get the proxy (``enable_internet=False`` alone is the network's job)."""
        return bool(
            self.allowed_hosts is not None
            or self.denied_hosts
            or self.outbound is not None
            or self.outbound_by_host
        )

    def replace(self, **changes: Any) -> EgressRules:
        return dataclasses.replace(self, **changes)

    def decide(self, host: str) -> Decision:
        """What happens to a plain HTTP request to ``host`` (rules in the module docstring)."""
        host = normalize_host(host)
        if _matches(host, self.denied_hosts):
            return Decision("block", why=f"{host} is in denied_hosts")
        if self.allowed_hosts is not None and not _matches(host, self.allowed_hosts):
            return Decision("block", why=f"{host} is not in allowed_hosts")
        by_host = {normalize_host(k): v for k, v in self.outbound_by_host.items()}
        handler = by_host.get(host)
        if handler is None:
            handler = next((v for k, v in by_host.items() if glob_match(k, host)), None)
        if handler is None:
            handler = self.outbound
        if handler is not None:
            return Decision("handle", handler)
        return self._forward_or_block(host)

    def decide_tunnel(self, host: str) -> Decision:
        """What happens to a CONNECT (HTTPS) to ``host``: handlers cannot see inside TLS."""
        host = normalize_host(host)
        if _matches(host, self.denied_hosts):
            return Decision("block", why=f"{host} is in denied_hosts")
        if self.allowed_hosts is not None and not _matches(host, self.allowed_hosts):
            return Decision("block", why=f"{host} is not in allowed_hosts")
        return self._forward_or_block(host)

    def _forward_or_block(self, host: str) -> Decision:
        if self.allowed_hosts is not None or self.enable_internet:
            return Decision("forward")
        return Decision("block", why=f"enable_internet is False and {host} is not allowed")


def proxy_env(port: int) -> dict[str, str]:
    """The environment that points a container's HTTP clients at its proxy."""
    url = f"http://127.0.0.1:{port}"
    local = "localhost,127.0.0.1,::1"
    return {
        "HTTP_PROXY": url,
        "http_proxy": url,
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "NO_PROXY": local,
        "no_proxy": local,
    }


async def call_handler(container: Any, handler: Handler, request: Request) -> Response:
    """Run ``handler`` for ``request``: a method name of ``container``'s class, or a
    callable taking ``(container, request)`` (a function written in the class body) or
    ``(request)`` (a bound method, a plain function of one argument)."""
    if isinstance(handler, str):
        method = getattr(container, handler, None)
        if handler.startswith("_") or not callable(method):
            raise TypeError(f"{type(container).__name__} has no public method {handler!r}")
        result = method(request)
    elif _takes_container(handler):
        result = handler(container, request)
    else:
        result = handler(request)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, Response):
        raise TypeError(f"outbound handler returned {type(result).__name__}, not a Response")
    return result


def _takes_container(handler: Callable[..., Any]) -> bool:
    if inspect.ismethod(handler):
        return False
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2
