"""What a Container object reports about its container: state, and how a run ended.

The shapes are Cloudflare's (``@cloudflare/containers``), so code ported from TypeScript
reads the same fields: ``State.status / lastChange / exitCode`` and ``StopParams.exitCode /
reason``. The snake_case names Dockyard had before stay readable as properties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ContainerError

__all__ = [
    "SIGNALS",
    "CloudflareStopReason",
    "State",
    "Status",
    "StopParams",
    "StopReason",
    "signal_number",
]

SIGNALS = {"SIGTERM": 15, "SIGINT": 2, "SIGKILL": 9}

# "paused" is Dockyard's extension (sleep_mode = "pause"); the rest are Cloudflare's.
Status = Literal["stopped", "running", "healthy", "stopping", "stopped_with_code", "paused"]
# Dockyard's reasons a run ended: the process ended by itself, stop(), destroy(), killed
# for memory, put to sleep after sleep_after, replaced by a rollout, the node shutting down.
StopReason = Literal["exit", "stop", "destroy", "oom", "sleep", "rollout", "shutdown"]
# Cloudflare's: the process ended by itself, or the runtime signalled it.
CloudflareStopReason = Literal["exit", "runtime_signal"]


@dataclass(frozen=True, slots=True)
class State:
    """Cloudflare's ``getState()`` shape: ``lastChange`` is in milliseconds since the
    epoch, ``exitCode`` is set once a run ended."""

    status: Status
    lastChange: float  # Cloudflare's name
    exitCode: int | None = None

    @property
    def last_change(self) -> float:
        """When the status last changed, in seconds since the epoch."""
        return self.lastChange / 1000

    @property
    def exit_code(self) -> int | None:
        return self.exitCode

    @classmethod
    def at(cls, status: Status, when: float, exit_code: int | None = None) -> State:
        """A state that changed at ``when`` (seconds since the epoch)."""
        return cls(status, when * 1000, exit_code)


@dataclass(frozen=True, slots=True)
class StopParams:
    """Why a container run ended, as ``on_stop`` receives it.

    ``reason`` is Cloudflare's: ``exit`` (its process ended by itself) or
    ``runtime_signal`` (the platform or ``stop()``/``destroy()`` signalled it).
    ``dockyard_reason`` is finer: ``exit``, ``stop``, ``destroy``, ``oom`` (killed for
    using too much memory), ``sleep`` (``sleep_after`` passed), ``rollout`` or
    ``shutdown`` (the node stopped).
    """

    exit_code: int
    reason: CloudflareStopReason
    dockyard_reason: StopReason

    @classmethod
    def of(cls, exit_code: int, why: StopReason) -> StopParams:
        return cls(exit_code, "exit" if why == "exit" else "runtime_signal", why)

    @property
    def exitCode(self) -> int:  # Cloudflare's name
        return self.exit_code


def signal_number(signal: str | int) -> int:
    if isinstance(signal, int):
        return signal
    number = SIGNALS.get(signal.upper())
    if number is None:
        raise ContainerError(f"stop(): unknown signal {signal!r}; use SIGTERM, SIGINT or SIGKILL")
    return number
