"""Durable Object ids: 64 hex characters, made and checked by one namespace.

An id is 32 bytes: a 16-byte body and a 16-byte tag, ``HMAC-SHA256(key, body)``, where the
key is the app and the class's id key: its name, or for a renamed class the id key of the
class it was renamed from (see ``objects.migrations``). A named id's body is
``HMAC-SHA256(key, name)``, so ``id_from_name`` is deterministic and stable across restarts;
a unique id's body is random. The tag lets ``id_from_string`` refuse an id that another
namespace made.

Names are at most 1024 bytes of UTF-8 (Cloudflare documents no limit). A name is an
address, not data: 1 KiB holds any URL path, e-mail address, user or tenant id with
room to spare, while it keeps every place a name is held (the id cache, stubs, the alarm
index, log lines) small. A longer name, or one that is not valid Unicode (a lone
surrogate), is ``InvalidObjectName`` (400).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from dockyard.errors import InvalidObjectId, InvalidObjectName

__all__ = ["MAX_NAME_BYTES", "DurableObjectId", "IdFactory"]

MAX_NAME_BYTES = 1024

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
    # per call showed up in profiles, so recent names are remembered: up to 4096 of them
    # and about 1 MiB (each entry counted as its name's bytes plus 256 for the id).
    NAME_CACHE_SIZE = 4096
    NAME_CACHE_BYTES = 1024 * 1024
    _ENTRY_OVERHEAD = 256

    def __init__(self, app: str, class_name: str, id_key: str | None = None) -> None:
        self.class_name = class_name
        self._app = app
        self._named: dict[str, DurableObjectId] = {}
        self._named_bytes = 0
        self.rekey(id_key)

    def rekey(self, id_key: str | None) -> None:
        """Make ids with ``id_key`` (None: the class name), as migrations decided; before
        the host starts, so no id of the previous key is in use."""
        self.id_key = id_key or self.class_name
        self._key = f"{self._app}\x00{self.id_key}".encode()
        self._named.clear()
        self._named_bytes = 0

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()[:16]

    def _make(self, body: bytes, name: str | None) -> DurableObjectId:
        tag = self._mac(b"tag:" + body)
        return DurableObjectId((body + tag).hex(), name, self.class_name)

    def from_name(self, name: str) -> DurableObjectId:
        cached = self._named.get(name) if type(name) is str else None
        if cached is None:
            raw = _name_bytes(name)
            cached = self._make(self._mac(b"name:" + raw), name)
            cost = len(raw) + self._ENTRY_OVERHEAD
            if (
                len(self._named) >= self.NAME_CACHE_SIZE
                or self._named_bytes + cost > self.NAME_CACHE_BYTES
            ):
                self._named.clear()
                self._named_bytes = 0
            self._named[name] = cached
            self._named_bytes += cost
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


def _name_bytes(name: object) -> bytes:
    if not isinstance(name, str):
        raise InvalidObjectName(f"an object name must be a str, got {type(name).__name__}")
    if len(name) > MAX_NAME_BYTES:  # each character is at least one byte
        raise InvalidObjectName(_too_long(name, f"{len(name)} characters"))
    try:
        raw = name.encode()
    except UnicodeEncodeError as error:
        raise InvalidObjectName(
            f"object name {_shown(name)} is not valid Unicode: it holds a lone surrogate "
            f"at position {error.start}"
        ) from None
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidObjectName(_too_long(name, f"{len(raw)} bytes"))
    return raw


def _too_long(name: str, size: str) -> str:
    return (
        f"object name {_shown(name)} is {size}; names are at most {MAX_NAME_BYTES} bytes of UTF-8"
    )


def _shown(name: str) -> str:
    text = ascii(name[:40])
    return text if len(name) <= 40 else text[:-1] + "..." + text[-1]
