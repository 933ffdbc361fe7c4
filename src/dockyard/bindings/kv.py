"""Workers KV (``kv_namespaces``), stored locally in one SQLite file per namespace.

``env.MY_KV`` offers Cloudflare's API: ``get(key, type)`` (``"text"``, ``"json"``,
``"bytes"``/``"arrayBuffer"``, ``"stream"``; or a list of keys), ``get_with_metadata`` /
``getWithMetadata``, ``put(key, value, expiration=, expirationTtl=, metadata=)``,
``delete(key)`` and ``list(prefix=, limit=, cursor=)``. Data lives under
``.dockyard/kv/<id or binding>.sqlite`` and survives restarts; an expired key reads as
missing and is removed at the next write.

Limits are Cloudflare's: keys 1-512 bytes (not ``.`` or ``..``), values up to 25 MiB,
metadata up to 1024 bytes of JSON, expirations at least 60 s ahead. Writes are
immediately visible (Cloudflare's are eventually consistent across locations).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from dockyard.errors import BindingError, InvalidType

from ._sqlite import open_database
from .records import KeyListing, Record, RecordList

__all__ = ["KvNamespace"]

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 25 * 1024 * 1024
MAX_METADATA_BYTES = 1024
MIN_TTL_SECONDS = 60
MAX_LIST_LIMIT = 1000
MAX_BULK_KEYS = 100
_TYPES = {"text", "json", "bytes", "arrayBuffer", "stream"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
    "expiration INTEGER, metadata TEXT) WITHOUT ROWID"
)


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidType(f"KV keys are strings, got {type(key).__name__}")
    size = len(key.encode())
    if size == 0 or key in (".", ".."):
        raise BindingError(f'KV key {key!r} is not allowed (empty, "." or "..")')
    if size > MAX_KEY_BYTES:
        raise BindingError(f"KV key is {size} bytes; keys are at most {MAX_KEY_BYTES} bytes")
    return key


def _read_type(type_: Any, options: Any) -> str:
    if isinstance(type_, dict):  # get(key, {"type": "json", "cacheTtl": 60})
        options, type_ = type_, None
    if type_ is None and isinstance(options, dict):
        type_ = options.get("type")
    kind = type_ or "text"
    if kind not in _TYPES:
        raise BindingError(
            f"KV get(): unknown type {kind!r} (expected text, json, bytes, arrayBuffer or stream)"
        )
    return str(kind)


async def _stream(data: bytes) -> AsyncIterator[bytes]:
    yield data


class KvNamespace:
    """One KV namespace binding."""

    def __init__(self, path: Path, *, name: str, min_ttl: int = MIN_TTL_SECONDS) -> None:
        self.path = path
        self.name = name
        # Cloudflare's floor for expirations; lowered only by tests of expiry itself.
        self.min_ttl = min_ttl
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<KvNamespace {self.name}>"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_database(self.path, _SCHEMA)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- reads --------------------------------------------------------------------------

    def _row(self, key: str) -> tuple[bytes, str | None] | None:
        row = self._db.execute(
            "SELECT value, metadata FROM kv WHERE key = ? AND (expiration IS NULL OR "
            "expiration > ?)",
            (key, int(time.time())),
        ).fetchone()
        return None if row is None else (bytes(row[0]), row[1])

    @staticmethod
    def _decode(data: bytes, kind: str) -> Any:
        if kind == "text":
            return data.decode("utf-8", errors="replace")
        if kind == "json":
            return json.loads(data)
        if kind == "stream":
            return _stream(data)
        return data

    async def get(self, key: str | Iterable[str], type: Any = None, **options: Any) -> Any:
        """The value, or None if missing; a list of keys gives a dict of key to value."""
        kind = _read_type(type, options)
        if not isinstance(key, str):
            keys = [_check_key(k) for k in key]
            if len(keys) > MAX_BULK_KEYS:
                raise BindingError(f"KV get() takes at most {MAX_BULK_KEYS} keys at once")
            if kind not in ("text", "json"):
                raise BindingError('KV get() of several keys takes type "text" or "json"')
            out = {}
            for k in keys:
                row = self._row(k)
                out[k] = None if row is None else self._decode(row[0], kind)
            return out
        row = self._row(_check_key(key))
        return None if row is None else self._decode(row[0], kind)

    async def get_with_metadata(self, key: str, type: Any = None, **options: Any) -> Record:
        """``{value, metadata, cacheStatus}`` (attributes or keys); both None if missing."""
        kind = _read_type(type, options)
        row = self._row(_check_key(key))
        if row is None:
            return Record(value=None, metadata=None, cacheStatus=None)
        metadata = None if row[1] is None else json.loads(row[1])
        return Record(value=self._decode(row[0], kind), metadata=metadata, cacheStatus=None)

    getWithMetadata = get_with_metadata

    # -- writes -------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        value: str | bytes | bytearray | memoryview,
        options: dict[str, Any] | None = None,
        *,
        expiration: float | None = None,
        expirationTtl: float | None = None,  # Cloudflare's spelling
        expiration_ttl: float | None = None,
        metadata: Any = None,
    ) -> None:
        _check_key(key)
        if options:
            expiration = options.get("expiration", expiration)
            expirationTtl = options.get("expirationTtl", expirationTtl)
            metadata = options.get("metadata", metadata)
        if isinstance(value, str):
            data = value.encode()
        elif isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        else:
            raise InvalidType(
                f"KV put() takes a str or bytes value, got {type(value).__name__} "
                "(use json.dumps for objects)"
            )
        if len(data) > MAX_VALUE_BYTES:
            raise BindingError(
                f"KV value for {key!r} is {len(data)} bytes; values are at most 25 MiB"
            )
        expires = self._expiration(expiration, expirationTtl or expiration_ttl)
        meta_text = None
        if metadata is not None:
            try:
                meta_text = json.dumps(metadata, separators=(",", ":"))
            except (TypeError, ValueError) as error:
                raise BindingError(f"KV metadata must be JSON-serialisable: {error}") from None
            if len(meta_text.encode()) > MAX_METADATA_BYTES:
                raise BindingError(
                    f"KV metadata is {len(meta_text.encode())} bytes serialised; "
                    f"the limit is {MAX_METADATA_BYTES}"
                )
        db = self._db
        db.execute(
            "DELETE FROM kv WHERE expiration IS NOT NULL AND expiration <= ?", (time.time(),)
        )
        db.execute(
            "INSERT OR REPLACE INTO kv (key, value, expiration, metadata) VALUES (?, ?, ?, ?)",
            (key, data, expires, meta_text),
        )

    def _expiration(self, expiration: float | None, ttl: float | None) -> int | None:
        now = time.time()
        if ttl is not None:
            if not isinstance(ttl, int | float) or ttl < self.min_ttl:
                raise BindingError(
                    f"KV PUT failed: 400 Invalid expiration_ttl of {ttl}. Expiration TTL must "
                    f"be at least {self.min_ttl}."
                )
            return int(now + ttl)
        if expiration is not None:
            if not isinstance(expiration, int | float) or expiration < now + self.min_ttl:
                raise BindingError(
                    f"KV PUT failed: 400 Invalid expiration of {expiration}. Expiration times "
                    f"must be at least {self.min_ttl} seconds in the future."
                )
            return int(expiration)
        return None

    async def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (_check_key(key),))

    # -- listing ------------------------------------------------------------------------

    async def list(
        self,
        options: dict[str, Any] | None = None,
        *,
        prefix: str | None = None,
        limit: int = MAX_LIST_LIMIT,
        cursor: str | None = None,
    ) -> KeyListing:
        """``{keys: [{name, expiration?, metadata?}], list_complete, cursor?}`` in key order."""
        if options:
            prefix = options.get("prefix", prefix)
            limit = options.get("limit", limit)
            cursor = options.get("cursor", cursor)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise BindingError(f"KV list(): limit must be 1-{MAX_LIST_LIMIT}, got {limit!r}")
        where = ["(expiration IS NULL OR expiration > ?)"]
        args: list[Any] = [int(time.time())]
        if prefix:
            # Byte-wise prefix match: keys sort and compare as UTF-8 bytes.
            where.append("substr(CAST(key AS BLOB), 1, ?) = CAST(? AS BLOB)")
            args += [len(prefix.encode()), prefix]
        if cursor:
            try:
                after = base64.urlsafe_b64decode(cursor.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                raise BindingError(f"KV list(): invalid cursor {cursor!r}") from None
            where.append("key > ?")
            args.append(after)
        rows = self._db.execute(
            f"SELECT key, expiration, metadata FROM kv WHERE {' AND '.join(where)} "
            "ORDER BY key LIMIT ?",
            [*args, limit + 1],
        ).fetchall()
        complete = len(rows) <= limit
        keys = RecordList()
        for name, expires, meta in rows[:limit]:
            entry = Record(name=name)
            if expires is not None:
                entry["expiration"] = expires
            if meta is not None:
                entry["metadata"] = json.loads(meta)
            keys.append(entry)
        result = KeyListing(keys=keys, list_complete=complete, cacheStatus=None)
        if not complete:
            result["cursor"] = base64.urlsafe_b64encode(keys[-1]["name"].encode()).decode()
        return result
