"""Dockyard: containers on demand behind Python Workers and Durable Objects.

from dockyard import Container, DurableObject, Request, Response, get_container
"""

from .containers import (
    Container,
    Schedule,
    State,
    StopParams,
    get_container,
    get_random,
    load_balance,
    switch_port,
)
from .errors import DockyardError
from .http import Request, Response, WebSocket, WebSocketPair
from .objects import DurableObject
from .worker import Env, ExecutionContext, WorkerEntrypoint

__all__ = [
    "Container",
    "DockyardError",
    "DurableObject",
    "Env",
    "ExecutionContext",
    "Request",
    "Response",
    "Schedule",
    "State",
    "StopParams",
    "WebSocket",
    "WebSocketPair",
    "WorkerEntrypoint",
    "get_container",
    "get_random",
    "load_balance",
    "switch_port",
]
__version__ = "0.1.0"
