"""The few Docker Engine calls the bench makes, over the engine's unix socket.

``docker run`` itself goes through the docker CLI (that is the baseline a user has);
everything else (listing, ports, events, removal) uses the Engine API, so watching the
engine costs milliseconds rather than a CLI process each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

__all__ = ["Engine", "EngineError", "docker_run", "unframe"]

CONTAINER_PORT = 8080


class EngineError(RuntimeError):
    pass


def _socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise EngineError(f"DOCKER_HOST={host!r}: the bench only talks to a local unix socket")
    return host.removeprefix("unix://")


def _label_filter(labels: Mapping[str, str], **more: list[str]) -> str:
    return json.dumps({"label": [f"{k}={v}" for k, v in labels.items()], **more})


class Engine:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=_socket_path()),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def _get(self, path: str, **params: str) -> Any:
        async with self._session.get(f"http://docker{path}", params=params) as response:
            if response.status >= 400:
                raise EngineError(f"GET {path}: {response.status} {await response.text()}")
            return await response.json(content_type=None)

    async def containers(
        self, labels: Mapping[str, str], *, status: str | None = None
    ) -> list[dict[str, Any]]:
        """Containers (running or not) carrying every one of ``labels``."""
        extra = {"status": [status]} if status else {}
        found: list[dict[str, Any]] = await self._get(
            "/containers/json", all="1", filters=_label_filter(labels, **extra)
        )
        return found

    async def host_port(self, container_id: str, port: int = CONTAINER_PORT) -> int:
        info = await self._get(f"/containers/{container_id}/json")
        bindings = (info["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp") or []
        if not bindings:
            raise EngineError(f"container {container_id[:12]} publishes no port {port}")
        return int(bindings[0]["HostPort"])

    async def starts(self, labels: Mapping[str, str], since: float, until: float) -> int:
        """How many containers carrying ``labels`` the engine started in [since, until]."""
        params = {
            "since": str(int(since) - 1),
            "until": str(int(until) + 1),
            "filters": _label_filter(labels, type=["container"], event=["start"]),
        }
        async with self._session.get("http://docker/events", params=params) as events:
            text = await events.text()
        return sum(1 for line in text.splitlines() if line.strip())

    async def output(self, container_id: str) -> str:
        """What the container printed so far (stdout and stderr, without stream framing)."""
        async with self._session.get(
            f"http://docker/containers/{container_id}/logs", params={"stdout": "1", "stderr": "1"}
        ) as response:
            if response.status >= 400:
                raise EngineError(f"logs of {container_id[:12]}: {await response.text()}")
            return unframe(await response.read()).decode(errors="replace")

    async def remove(self, container_id: str) -> None:
        async with self._session.delete(
            f"http://docker/containers/{container_id}", params={"force": "1", "v": "1"}
        ) as response:
            if response.status not in (204, 404):
                raise EngineError(f"remove {container_id[:12]}: {await response.text()}")

    async def remove_all(self, labels: Mapping[str, str]) -> int:
        found = await self.containers(labels)
        await asyncio.gather(*(self.remove(c["Id"]) for c in found))
        return len(found)

    async def wait_gone(self, labels: Mapping[str, str]) -> None:
        """Until no container (running or not) carries ``labels``; bound it with a timeout."""

        async def gone() -> bool:
            return not await self.containers(labels)

        await self._wait(labels, gone, ["destroy"])

    async def wait_paused(self, labels: Mapping[str, str]) -> None:
        """Until a container carrying ``labels`` is paused; bound it with a timeout."""

        async def paused() -> bool:
            return bool(await self.containers(labels, status="paused"))

        await self._wait(labels, paused, ["pause"])

    async def _wait(
        self, labels: Mapping[str, str], done: Callable[[], Awaitable[bool]], events: list[str]
    ) -> None:
        # Subscribe first, then look: an event between the two cannot be missed. The
        # container list may lag its event by a moment, so a quiet stream means look again.
        filters = _label_filter(labels, type=["container"], event=events)
        async with self._session.get(
            "http://docker/events",
            params={"filters": filters},
            timeout=aiohttp.ClientTimeout(total=None),
        ) as stream:
            while not await done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        if not await stream.content.readline():
                            raise EngineError("the engine closed its event stream")


def unframe(raw: bytes) -> bytes:
    """A log stream without a TTY: each chunk has 1 byte of stream, 3 zero bytes and a
    4-byte big-endian size in front of it."""
    chunks, at = [], 0
    while at + 8 <= len(raw):
        size = int.from_bytes(raw[at + 4 : at + 8], "big")
        chunks.append(raw[at + 8 : at + 8 + size])
        at += 8 + size
    return b"".join(chunks)


async def docker_run(image: str, labels: Mapping[str, str], *command: str) -> str:
    """``docker run -d -p 127.0.0.1::8080 IMAGE [COMMAND]``, as a user would; returns the id."""
    label_args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
    proc = await asyncio.create_subprocess_exec(
        "docker",
        "run",
        "-d",
        *label_args,
        "-p",
        f"127.0.0.1::{CONTAINER_PORT}",
        image,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0:
        raise EngineError(f"docker run {image} failed: {err.decode(errors='replace').strip()}")
    return out.decode().strip()
