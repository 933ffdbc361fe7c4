"""How storage values become bytes.

A value is stored as UTF-8 JSON (compact, NaN and infinities allowed) of this tree:

- ``str``, ``int`` (any size), ``float``, ``bool``, ``None``: the JSON scalar;
- ``list``: a JSON array of encoded items;
- ``dict`` with ``str`` keys: a JSON object of encoded values; if any key starts with
  ``$`` the object is wrapped as ``{"$d": {...}}`` so it cannot be mistaken for a tag;
- ``bytes`` (also ``bytearray`` / ``memoryview``, read back as ``bytes``):
  ``{"$b": "<base64>"}``.

Types are checked exactly (a ``tuple``, ``set``, ``IntEnum`` or ``datetime`` is refused
rather than read back as something else), and nesting is limited to 100 levels.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from dockyard.errors import StorageError

__all__ = ["decode", "encode"]

MAX_DEPTH = 100
_SCALARS = (str, int, float, bool, type(None))


def show_key(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def encode(value: Any, key: str) -> bytes:
    if type(value) in _SCALARS:
        tree = value
    else:
        tree = _tree(value, key, "", 0)
    return json.dumps(tree, separators=(",", ":"), ensure_ascii=False).encode()


def _tree(value: Any, key: str, path: str, depth: int) -> Any:
    kind = type(value)
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
    where = f" at {path}" if path else ""
    raise StorageError(
        f"cannot store a value of type {kind.__qualname__} for key {show_key(key)}{where}: "
        f"storage holds str, int, float, bool, None, bytes, list and dict"
    )


def decode(data: bytes) -> Any:
    return _untree(json.loads(data))


def _untree(tree: Any) -> Any:
    if type(tree) is list:
        return [_untree(item) for item in tree]
    if type(tree) is dict:
        if len(tree) == 1:
            if "$b" in tree:
                return base64.b64decode(tree["$b"])
            if "$d" in tree:
                return {k: _untree(v) for k, v in tree["$d"].items()}
        return {k: _untree(v) for k, v in tree.items()}
    return tree
