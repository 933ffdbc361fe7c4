"""RPC copies (dockyard.compat.clone): what is copied, what is shared, what is refused."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import NamedTuple

import pytest

from dockyard.compat.clone import clone
from dockyard.errors import DataCloneError
from dockyard.http import Response


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int
    tags: list[str]


class Pair(NamedTuple):
    a: list[int]
    b: int


def test_containers_are_deep_copies_and_scalars_pass() -> None:
    when = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    value = {
        "list": [1, [2, 3]],
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "tuple": (1, [2]),
        "bytes": b"x",
        "buffer": bytearray(b"y"),
        "big": 2**100,
        "when": when,
        "point": Point(1, ["t"]),
        "pair": Pair([1], 2),
        "colour": Colour.RED,
        7: "int keys too",
    }
    copied = clone(value)
    assert copied == value
    assert copied["list"] is not value["list"] and copied["list"][1] is not value["list"][1]
    assert copied["tuple"][1] is not value["tuple"][1]
    assert copied["buffer"] is not value["buffer"]
    assert copied["point"] is not value["point"] and copied["point"].tags is not value["point"].tags
    assert type(copied["pair"]) is Pair and copied["pair"].a is not value["pair"].a
    assert copied["when"] is when and copied["colour"] is Colour.RED


def test_shared_references_and_cycles_are_kept() -> None:
    shared = [1]
    cyclic: list[object] = [shared, shared]
    cyclic.append(cyclic)
    copied = clone(cyclic)
    assert copied[0] is copied[1] and copied[0] is not shared
    assert copied[2] is copied


def test_transferred_values_are_not_copied() -> None:
    response = Response("x")
    error = ValueError("boom")
    assert clone([response, error]) == [response, error]
    assert clone([response])[0] is response


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda: 1, "value is a function, which cannot be sent over RPC"),
        ({"k": [object()]}, "value at ['k'][0] is a object, which cannot be sent over RPC"),
        (Point(1, [print]), "value at .tags[0] is a builtin_function_or_method"),
    ],
)
def test_uncopyable_values_are_refused_with_their_path(value: object, message: str) -> None:
    with pytest.raises(DataCloneError) as caught:
        clone(value)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, TypeError)  # what Cloudflare raises
