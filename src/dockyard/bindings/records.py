"""``Record``: a dict whose keys are also attributes, for results Cloudflare returns as
JavaScript objects (``result.results``, ``row.author``, ``listing.list_complete``).

It is a real ``dict``: ``Response.json(record)`` and ``json.dumps`` take it as it is, and
``to_py()`` (what Cloudflare's Python code calls on a JavaScript object) returns plain
dicts and lists. A key named like a dict method (``items``, ``values``, ``get``, ...) is
read with ``record["items"]``; the one exception is KV's listing, whose ``keys`` is the
list of keys (as on Cloudflare) rather than the dict method.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KeyListing", "Record", "RecordList", "to_plain"]


class Record(dict[str, Any]):
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_py(self) -> dict[str, Any]:
        return to_plain(self)


class KeyListing(Record):
    """KV's ``list()`` result: ``listing.keys`` is the list of keys, as on Cloudflare."""

    __slots__ = ()

    @property
    def keys(self) -> Any:
        return self["keys"]


class RecordList(list[Any]):
    """A list with ``to_py()``, for JavaScript arrays in results."""

    __slots__ = ()

    def to_py(self) -> list[Any]:
        return to_plain(self)


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value
