"""Durable Objects: one live instance per id, SQLite storage, alarms.

host = ObjectHost(state_dir, app="my-app")
host.set_class("Counter", Counter)
env.COUNTER = host.namespace("Counter")
await env.COUNTER.get_by_name("a").increment()
"""

from .alarms import AlarmInfo
from .base import DurableObject, DurableObjectState
from .host import HostStatistics, ObjectHost
from .ids import DurableObjectId
from .namespace import DurableObjectNamespace
from .sql import SqlCursor, SqlStorage
from .storage import DurableObjectStorage, KeyValueStore
from .stub import DurableObjectStub, ObjectDelivery

__all__ = [
    "AlarmInfo",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStorage",
    "DurableObjectStub",
    "HostStatistics",
    "KeyValueStore",
    "ObjectDelivery",
    "ObjectHost",
    "SqlCursor",
    "SqlStorage",
]
