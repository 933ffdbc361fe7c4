"""Cloudflare's option and result shapes for the ``Container`` facade.

``@cloudflare/containers`` takes option objects (``startOptions``, ``waitOptions``,
``cancellationOptions``) and returns a ``Schedule`` with camelCase fields; this module
turns the options into what the supervisor takes and the stored rows into that shape,
so ``container.py`` stays about the lifecycle.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ContainerError, StartFailed
from .schedules import Schedule
from .supervisor import StartOverrides

__all__ = [
    "CANCELLATION_KEYS",
    "START_KEYS",
    "WAIT_KEYS",
    "ContainerSchedule",
    "known_options",
    "positional_capacity",
    "start_overrides",
    "takes_two",
    "within",
]


@dataclass(frozen=True, slots=True)
class ContainerSchedule(Schedule):
    """A schedule as Cloudflare's ``schedule()`` returns it: ``taskId``, ``callback``,
    ``payload``, ``type``, ``time`` (seconds since the epoch) and, for a delay,
    ``delayInSeconds``; Dockyard's ``id`` and ``delay_seconds`` say the same."""

    taskId: str = ""  # Cloudflare's name
    delayInSeconds: float | None = None

    @classmethod
    def of(cls, row: Schedule) -> ContainerSchedule:
        return cls(
            row.id,
            row.callback,
            row.payload,
            row.time,
            row.type,
            row.delay_seconds,
            taskId=row.id,
            delayInSeconds=row.delay_seconds,
        )


def positional_capacity(function: Any) -> float | None:
    """How many positional arguments `function` takes (inf with ``*args``); None when its
    signature cannot be read."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = 0
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL:
            return math.inf
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional


def takes_two(method: Any) -> bool:
    """Whether a scheduled method accepts (payload, schedule), not only (payload)."""
    capacity = positional_capacity(method)
    return capacity is not None and capacity >= 2


START_KEYS = {
    "envVars": "env_vars",
    "entrypoint": "entrypoint",
    "enableInternet": "enable_internet",
    "labels": "labels",
}
CANCELLATION_KEYS = frozenset(
    {"abort", "instanceGetTimeoutMS", "portReadyTimeoutMS", "waitInterval"}
)
WAIT_KEYS = frozenset({"portToCheck", "retries", "waitInterval", "signal"})


def known_options(
    given: Mapping[str, Any] | None, keys: frozenset[str], what: str
) -> dict[str, Any]:
    found = dict(given or {})
    unknown = sorted(set(found) - keys)
    if unknown:
        raise ContainerError(
            f"{what}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(keys))}"
        )
    return found


def start_overrides(
    start_options: Mapping[str, Any] | None,
    env_vars: dict[str, str] | None = None,
    entrypoint: list[str] | None = None,
    enable_internet: bool | None = None,
) -> StartOverrides:
    """Cloudflare's start options (camelCase, or the snake_case keywords) as overrides."""
    given = {START_KEYS.get(k, k): v for k, v in (start_options or {}).items()}
    known_options(given, frozenset(START_KEYS.values()), "start_options")
    return StartOverrides(
        env_vars=env_vars if env_vars is not None else given.get("env_vars"),
        entrypoint=entrypoint if entrypoint is not None else given.get("entrypoint"),
        enable_internet=(
            enable_internet if enable_internet is not None else given.get("enable_internet")
        ),
        labels=given.get("labels"),
    )


T = TypeVar("T")


async def within(work: Awaitable[T], timeout_ms: float | None, abort: Any, message: str) -> T:
    """``work``, given up after ``timeout_ms`` or once ``abort`` (an ``asyncio.Event``) is
    set. The supervisor shields the start itself, so giving up only ends this wait."""
    if timeout_ms is None and abort is None:
        return await work
    task = asyncio.ensure_future(work)
    aborted = asyncio.ensure_future(abort.wait()) if abort is not None else None
    try:
        waits = {task} if aborted is None else {task, aborted}
        timeout = None if timeout_ms is None else timeout_ms / 1000
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise StartFailed("aborted" if aborted is not None and aborted.done() else message)
    finally:
        for pending in (task, aborted):
            if pending is not None and not pending.done():
                pending.cancel()
        await asyncio.gather(task, *([aborted] if aborted else []), return_exceptions=True)
