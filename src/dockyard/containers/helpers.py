"""Helpers for workers: pick a container object, or route a request to another port."""

from __future__ import annotations

import random
import warnings
from collections.abc import Generator
from typing import Any

from ..errors import InvalidArgument
from ..http import Request
from .container import SWITCH_PORT_HEADER

__all__ = ["RandomStub", "get_container", "get_random", "load_balance", "switch_port"]

DEFAULT_NAME = "singleton"


def get_container(binding: Any, name: str = DEFAULT_NAME) -> Any:
    """The stub of the container object called ``name`` (one container per name)."""
    return binding.get(binding.id_from_name(name))


class RandomStub:
    """What ``get_random`` returns: awaitable, as Cloudflare's ``getRandom`` returns a
    Promise (``stub = await get_random(env.X)``), and usable as the stub itself without
    ``await``, as Dockyard's ``get_random`` was (no engine work happens either way)."""

    __slots__ = ("_stub",)

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __await__(self) -> Generator[Any, None, Any]:
        return self._stub
        yield  # a generator: awaiting it returns the stub at once

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def __repr__(self) -> str:
        return f"<random {self._stub!r}>"


def get_random(binding: Any, instances: int = 3) -> RandomStub:
    """The stub of one of ``instances`` container objects, picked at random per call;
    await it (Cloudflare's ``getRandom``) or use it as is."""
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise InvalidArgument(f"get_random(): instances must be an integer >= 1, got {instances!r}")
    return RandomStub(get_container(binding, f"instance-{random.randrange(instances)}"))


def load_balance(binding: Any, instances: int = 3) -> Any:
    """Deprecated alias of :func:`get_random`."""
    warnings.warn(
        "load_balance() is deprecated; use get_random()", DeprecationWarning, stacklevel=2
    )
    return get_random(binding, instances)


def switch_port(request: Request, port: int) -> Request:
    """A copy of ``request`` that ``Container.fetch`` sends to ``port`` instead of
    default_port (as Cloudflare's ``switchPort``: the copy takes over the body stream;
    the original's headers are left as they were)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidArgument(f"switch_port(): port must be an integer 1-65535, got {port!r}")
    switched = Request(request)
    switched.headers[SWITCH_PORT_HEADER] = str(port)
    return switched
