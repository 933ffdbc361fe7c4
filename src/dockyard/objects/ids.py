"""Durable Object ids: 64 hex characters, made and checked by one namespace.

An id is 32 bytes: a 16-byte body and a 16-byte tag, ``HMAC-SHA256(key, body)``, where the
key is the app and class name. A named id's body is ``HMAC-SHA256(key, name)``, so
``id_from_name`` is deterministic and stable across restarts; a unique id's body is random.
The tag lets ``id_from_string`` refuse an id that another namespace made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from dockyard.errors import InvalidObjectId

__all__ = ["DurableObjectId", "IdFactory"]

_HEX_ID = re.compile(r"[0-9a-fA-F]{64}")


class DurableObjectId:
    """The address of one object: ``str(id)`` is its hex form; ``name`` is set if named."""

    __slots__ = ("hex", "name", "namespace")

    def __init__(self, hex: str, name: str | None, namespace: str) -> None:
        self.hex = hex
        self.name = name
        self.namespace = namespace

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        named = f" name={self.name!r}" if self.name is not None else ""
        return f"<DurableObjectId {self.namespace} {self.hex[:12]}…{named}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DurableObjectId):
            return NotImplemented
        return self.hex == other.hex and self.namespace == other.namespace

    def __hash__(self) -> int:
        return hash(self.hex)

    def equals(self, other: DurableObjectId) -> bool:
        return self == other


class IdFactory:
    """Makes and checks the ids of one namespace (one app, one class)."""

    # Named ids are asked for on every request (get_container(env.X, name)); two HMACs
    # per call showed up in profiles, so recent names are remembered.
    NAME_CACHE_SIZE = 4096

    def __init__(self, app: str, class_name: str) -> None:
        self.class_name = class_name
        self._key = f"{app}\x00{class_name}".encode()
        self._named: dict[str, DurableObjectId] = {}

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()[:16]

    def _make(self, body: bytes, name: str | None) -> DurableObjectId:
        tag = self._mac(b"tag:" + body)
        return DurableObjectId((body + tag).hex(), name, self.class_name)

    def from_name(self, name: str) -> DurableObjectId:
        if not isinstance(name, str):
            raise InvalidObjectId(f"an object name must be a str, got {type(name).__name__}")
        cached = self._named.get(name)
        if cached is None:
            if len(self._named) >= self.NAME_CACHE_SIZE:
                self._named.clear()
            cached = self._named[name] = self._make(self._mac(b"name:" + name.encode()), name)
        return cached

    def unique(self) -> DurableObjectId:
        return self._make(secrets.token_bytes(16), None)

    def from_string(self, text: str) -> DurableObjectId:
        if not isinstance(text, str) or not _HEX_ID.fullmatch(text):
            shown = repr(text) if len(repr(text)) <= 80 else repr(text)[:77] + "..."
            raise InvalidObjectId(
                f"invalid Durable Object id {shown}: expected 64 hexadecimal characters "
                f"(as made by id_from_name() or new_unique_id())"
            )
        raw = bytes.fromhex(text)
        if not hmac.compare_digest(raw[16:], self._mac(b"tag:" + raw[:16])):
            raise InvalidObjectId(
                f"Durable Object id {text[:12]}… was not made by namespace {self.class_name!r} "
                f"of this app"
            )
        return DurableObjectId(text.lower(), None, self.class_name)

    def owns(self, object_id: DurableObjectId) -> bool:
        return object_id.namespace == self.class_name
