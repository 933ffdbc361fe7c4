"""Containers owned by Durable Objects, on a real container engine."""

from .container import Container
from .helpers import get_container, get_random, load_balance, switch_port
from .manager import ContainerManager
from .schedules import Schedule
from .state import State, StopParams

__all__ = [
    "Container",
    "ContainerManager",
    "Schedule",
    "State",
    "StopParams",
    "get_container",
    "get_random",
    "load_balance",
    "switch_port",
]
