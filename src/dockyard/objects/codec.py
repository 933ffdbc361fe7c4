"""How storage keys are checked and values become bytes.

A value is stored as UTF-8 JSON (compact, NaN and infinities allowed) of this tree:

- ``str``, ``int``, ``float``, ``bool``, ``None``: the JSON scalar; an ``int`` beyond
  4,000 bits (JSON text of it would hit Python's digit limit) is ``{"$i": "<hex>"}``;
- ``list``: a JSON array of encoded items;
- ``dict`` with ``str`` keys: a JSON object of encoded values; if any key starts with
  ``$`` the object is wrapped as ``{"$d": {...}}`` so it cannot be mistaken for a tag;
- ``bytes`` (also ``bytearray`` / ``memoryview``, read back as ``bytes``):
  ``{"$b": "<base64>"}``;
- ``datetime`` (naive or aware; an aware one reads back with a fixed UTC offset):
  ``{"$t": "<ISO 8601>"}``;
- ``set`` (of any of the hashable types above): ``{"$s": [items]}``.

That is what Cloudflare's structured clone keeps that Python has (Date, ArrayBuffer,
Set, BigInt, arrays and plain objects). Types are checked exactly (a ``tuple``,
``frozenset``, ``IntEnum`` or ``date`` is refused rather than read back as something
else), and nesting is limited to 100 levels. A string holding a lone surrogate is kept
(stored as a JSON ``\\u`` escape).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from dockyard.errors import StorageError

__all__ = ["MAX_KEY_BYTES", "check_key", "decode", "encode", "show_key"]

MAX_DEPTH = 100
MAX_KEY_BYTES = 2 * 1024
# Python refuses to turn ints of more than 4,300 digits into text; 4,000 bits is 1,205.
_MAX_JSON_INT_BITS = 4000
_SCALARS = (str, int, float, bool, type(None))
_SUPPORTED = "str, int, float, bool, None, bytes, datetime, list, dict (str keys) and set"


def show_key(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def check_key(key: object) -> bytes:
    """The UTF-8 of a storage key; StorageError if it is not a str of at most 2 KiB."""
    if type(key) is not str:
        raise StorageError(f"storage keys must be str, got {type(key).__name__} ({key!r})")
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        raise StorageError(
            f"key {show_key(key)} is not valid Unicode (it holds a lone surrogate)"
        ) from None
    if len(raw) > MAX_KEY_BYTES:
        raise StorageError(
            f"key {show_key(key)} is {len(raw)} bytes; keys are at most {MAX_KEY_BYTES} bytes"
        )
    return raw


def encode(value: Any, key: str) -> bytes:
    kind = type(value)
    if kind in _SCALARS and not (kind is int and value.bit_length() > _MAX_JSON_INT_BITS):
        tree = value
    else:
        tree = _tree(value, key, "", 0)
    try:
        return json.dumps(tree, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form; as a \u escape it round-trips.
        return json.dumps(tree, separators=(",", ":")).encode()


def _tree(value: Any, key: str, path: str, depth: int) -> Any:
    kind = type(value)
    if kind is int and value.bit_length() > _MAX_JSON_INT_BITS:
        return {"$i": format(value, "x")}
    if kind in _SCALARS:
        return value
    if depth >= MAX_DEPTH:
        raise StorageError(
            f"value for key {show_key(key)} is nested deeper than {MAX_DEPTH} levels "
            f"(at {path or 'the top'}; a cycle?)"
        )
    if kind is list:
        return [_tree(item, key, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise StorageError(
                    f"cannot store a dict key of type {type(k).__name__} ({k!r}) in the value "
                    f"for key {show_key(key)} at {path or 'the top'}: dict keys must be str"
                )
            out[k] = _tree(v, key, f"{path}[{k!r}]", depth + 1)
        if any(k.startswith("$") for k in out):
            return {"$d": out}
        return out
    if kind in (bytes, bytearray, memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if kind is datetime:
        return {"$t": value.isoformat()}
    if kind is set:
        return {
            "$s": [_tree(item, key, f"{path}{{{i}}}", depth + 1) for i, item in enumerate(value)]
        }
    where = f" at {path}" if path else ""
    raise StorageError(
        f"cannot store a value of type {kind.__qualname__} for key {show_key(key)}{where}: "
        f"storage holds {_SUPPORTED}"
    )


def decode(data: bytes) -> Any:
    return _untree(json.loads(data))


def _untree(tree: Any) -> Any:
    if type(tree) is list:
        return [_untree(item) for item in tree]
    if type(tree) is dict:
        if len(tree) == 1:
            ((tag, inner),) = tree.items()
            if tag == "$b":
                return base64.b64decode(inner)
            if tag == "$d":
                return {k: _untree(v) for k, v in inner.items()}
            if tag == "$t":
                return datetime.fromisoformat(inner)
            if tag == "$s":
                return {_untree(item) for item in inner}
            if tag == "$i":
                return int(inner, 16)
        return {k: _untree(v) for k, v in tree.items()}
    return tree
