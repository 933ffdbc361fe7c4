"""parse_duration: seconds as numbers, or "<digits><s|m|h>" strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockyard.durations import parse_duration
from dockyard.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("0s", 0.0),
        ("2s", 2.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("90m", 5400.0),
        ("007s", 7.0),
    ],
)
def test_good_values(value: int | float | str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, float("nan"), float("inf"), True, "", "10", "ten minutes", "10 m", "1.5h", "10M",
     "1d", "-5s", " 10m", "10m ", "10ms", None, [10]],
)  # fmt: skip
def test_bad_values(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, where="sleep_after")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("sleep_after: expected seconds as a number or a string like")
    assert '"10m"' in message
    assert "got " in message


def test_error_message_shows_the_bad_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("ten minutes", where="sleep_after")
    assert str(info.value) == (
        'sleep_after: expected seconds as a number or a string like "10m" '
        '(digits then s, m or h), got "ten minutes"'
    )


def test_without_where_the_message_is_just_the_expectation() -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("x")
    assert str(info.value).startswith("expected seconds")


@given(n=st.integers(min_value=0, max_value=10**12), unit=st.sampled_from("smh"))
def test_unit_strings_round_trip(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * {"s": 1, "m": 60, "h": 3600}[unit]


@given(st.integers(min_value=0, max_value=10**12) | st.floats(min_value=0, allow_infinity=False))
def test_numbers_are_seconds(value: float) -> None:
    assert parse_duration(value) == value
