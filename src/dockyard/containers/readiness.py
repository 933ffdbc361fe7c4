"""Readiness: when a started container's port counts as up.

Any HTTP answer on the port, whatever its status, means the server is up. Probes back
off from 10 ms to ``wait_interval``, each with its own timeout, within ``port_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from ..errors import ContainerError, StartFailed
from .proxy import target_url

if TYPE_CHECKING:
    from .supervisor import ContainerSupervisor

__all__ = ["Readiness", "last_output", "wait_for_port"]


@dataclass(frozen=True, slots=True)
class Readiness:
    # Host and path of the probe: "ping" probes "/" with Host: ping.
    ping_endpoint: str
    port_timeout: float
    probe_timeout: float
    wait_interval: float


async def wait_for_port(
    supervisor: ContainerSupervisor,
    port: int,
    rules: Readiness,
    *,
    stopped: asyncio.Event,
    exit_code: Callable[[], int | None],
) -> None:
    """Return once ``port`` answers HTTP; StartFailed when it never does or the
    container exits first (with its last output, to say why)."""
    host, _, path = rules.ping_endpoint.partition("/")
    session = supervisor.manager.session
    deadline = time.monotonic() + rules.port_timeout
    interval = 0.01
    while True:
        info = supervisor.info
        if info is not None and port not in info.host_ports:
            # No published port usually means the process died at once; let the
            # monitor confirm that before blaming the configuration.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), 2.0)
        if supervisor.info is None:
            raise StartFailed(
                f"the container exited with code {exit_code()} before port "
                f"{port} answered{_summary(supervisor.last_output)}"
            )
        url = target_url(f"http://{host or 'container'}/{path}", supervisor.host_port(port))
        remaining = deadline - time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=min(rules.probe_timeout, max(remaining, 0.1)))
            async with session.get(url, headers={"Host": host}, timeout=timeout) as probe:
                await probe.read()
            return  # any HTTP answer means the server is up
        except (aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() + interval > deadline:
            raise StartFailed(
                f"port {port} did not answer HTTP within {rules.port_timeout}s "
                f"(probed /{path} with Host: {host}); check that the server listens on "
                f"0.0.0.0:{port}{await last_output(supervisor)}"
            )
        await asyncio.sleep(interval)
        interval = min(interval * 2, rules.wait_interval)


async def last_output(supervisor: ContainerSupervisor) -> str:
    """The container's last few log lines, as a suffix for an error message (for the
    log: clients see a short message and an error id instead)."""
    info = supervisor.info
    if info is None:
        return _summary(supervisor.last_output)
    try:
        lines = [line async for line in supervisor.manager.runtime.logs(info.id, tail=5)]
    except ContainerError:
        return ""
    return _summary(lines)


def _summary(lines: list[str]) -> str:
    return "; last output: " + " | ".join(lines) if lines else ""
