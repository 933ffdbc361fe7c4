"""Helpers for workers: pick a container object, or route a request to another port."""

from __future__ import annotations

import random
import warnings
from typing import Any

from ..http import Request
from .container import SWITCH_PORT_HEADER

__all__ = ["get_container", "get_random", "load_balance", "switch_port"]

DEFAULT_NAME = "singleton"


def get_container(binding: Any, name: str = DEFAULT_NAME) -> Any:
    """The stub of the container object called ``name`` (one container per name)."""
    return binding.get(binding.id_from_name(name))


def get_random(binding: Any, instances: int = 3) -> Any:
    """The stub of one of ``instances`` container objects, picked at random per call."""
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"get_random(): instances must be an integer >= 1, got {instances!r}")
    return get_container(binding, f"instance-{random.randrange(instances)}")


def load_balance(binding: Any, instances: int = 3) -> Any:
    """Deprecated alias of :func:`get_random`."""
    warnings.warn(
        "load_balance() is deprecated; use get_random()", DeprecationWarning, stacklevel=2
    )
    return get_random(binding, instances)


def switch_port(request: Request, port: int) -> Request:
    """Mark ``request`` so ``Container.fetch`` sends it to ``port`` instead of default_port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"switch_port(): port must be an integer 1-65535, got {port!r}")
    request.headers[SWITCH_PORT_HEADER] = str(port)
    return request
