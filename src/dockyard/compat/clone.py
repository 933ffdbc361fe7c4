"""Copies of RPC arguments and results, as Cloudflare's structured clone makes them.

On Cloudflare a stub call serialises its arguments and its result, so the object and its
caller never share a mutable value: appending to a list after passing it changes nothing
on the other side. Dockyard's objects live in the caller's process, so ``clone`` makes
that copy explicitly and refuses, at the call site, what could not cross a process
boundary.

Copied: ``None``, ``bool``, ``int`` (any size), ``float``, ``str``, ``bytes``,
``bytearray``, ``list``, ``tuple`` (named ones too), ``dict``, ``set``, ``frozenset``, the
``datetime`` types, and dataclass instances (Python's plain objects); enum members pass as
they are. Shared references and cycles are preserved within one value (as structured clone
does). Passed as they are (Cloudflare transfers these rather than copying them):
``Request``, ``Response``, ``WebSocket``, Durable Object stubs and ids, and exceptions.
Everything else (functions, coroutines, instances of user classes, ...) is a
``DataCloneError``, which is also a ``TypeError`` as on Cloudflare.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
from typing import Any

from dockyard.errors import DataCloneError

__all__ = ["clone"]

_IMMUTABLE = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
    }
)
_MAX_DEPTH = 200
_transferable: tuple[type, ...] | None = None


def _transfer_types() -> tuple[type, ...]:
    # Imported on first use: dockyard.objects imports this module.
    global _transferable
    if _transferable is None:
        from dockyard.http import Request, Response, WebSocket
        from dockyard.objects.ids import DurableObjectId
        from dockyard.objects.namespace import DurableObjectNamespace
        from dockyard.objects.stub import DurableObjectStub

        _transferable = (
            Request,
            Response,
            WebSocket,
            DurableObjectId,
            DurableObjectStub,
            DurableObjectNamespace,
            BaseException,
        )
    return _transferable


def clone(value: Any, what: str = "value") -> Any:
    """A deep copy of ``value`` as RPC would deliver it; ``what`` names it in errors."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    return _Cloner(what).copy(value, "", 0)


class _Cloner:
    def __init__(self, what: str) -> None:
        self.what = what
        self.memo: dict[int, Any] = {}

    def copy(self, value: Any, path: str, depth: int) -> Any:
        kind = type(value)
        if kind in _IMMUTABLE:
            return value
        done = self.memo.get(id(value))
        if done is not None:
            return done
        if depth > _MAX_DEPTH:
            raise DataCloneError(
                f"{self.what} is nested deeper than {_MAX_DEPTH} levels (at {path or 'the top'})"
            )
        if kind is list:
            out: list[Any] = []
            self.memo[id(value)] = out
            out.extend(self.copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
            return out
        if kind is dict:
            mapping: dict[Any, Any] = {}
            self.memo[id(value)] = mapping
            for k, v in value.items():
                key = self.copy(k, f"{path} key {k!r}", depth + 1)
                mapping[key] = self.copy(v, f"{path}[{k!r}]", depth + 1)
            return mapping
        if kind is tuple:
            return tuple(self.copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        if kind in (set, frozenset):
            items = [self.copy(v, f"{path} item", depth + 1) for v in value]
            return kind(items)
        if kind is bytearray:
            return bytearray(value)
        if kind is memoryview:
            return bytes(value)
        if isinstance(value, (enum.Enum, *_transfer_types())):
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # The Python form of a plain object: copied field by field.
            instance = copy.copy(value)
            self.memo[id(value)] = instance
            for field in dataclasses.fields(value):
                item = getattr(value, field.name)
                object.__setattr__(
                    instance, field.name, self.copy(item, f"{path}.{field.name}", depth + 1)
                )
            return instance
        if isinstance(value, tuple) and hasattr(kind, "_fields"):
            return kind(*(self.copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)))
        where = f" at {path}" if path else ""
        raise DataCloneError(
            f"{self.what}{where} is a {kind.__qualname__}, which cannot be sent over RPC: "
            "send str, int, float, bool, None, bytes, list, tuple, dict, set, datetime, "
            "a dataclass, a Request/Response, or a stub"
        )
