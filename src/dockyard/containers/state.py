"""What a Container object reports about its container: state, and how a run ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ContainerError

__all__ = ["SIGNALS", "State", "Status", "StopParams", "StopReason", "signal_number"]

SIGNALS = {"SIGTERM": 15, "SIGINT": 2, "SIGKILL": 9}

Status = Literal["stopped", "running", "healthy", "stopping", "stopped_with_code", "paused"]
StopReason = Literal["exit", "stop", "destroy", "oom"]


@dataclass(frozen=True, slots=True)
class State:
    status: Status
    last_change: float
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class StopParams:
    """Why a container run ended: ``exit`` (its process ended by itself), ``stop``
    (``stop()`` or sleep), ``destroy`` or ``oom`` (killed for using too much memory)."""

    exit_code: int
    reason: StopReason


def signal_number(signal: str | int) -> int:
    if isinstance(signal, int):
        return signal
    number = SIGNALS.get(signal.upper())
    if number is None:
        raise ContainerError(f"stop(): unknown signal {signal!r}; use SIGTERM, SIGINT or SIGKILL")
    return number
