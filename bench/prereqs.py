"""What the bench needs before it starts: the engine, wrk and nginx, the base images."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import time
from pathlib import Path

__all__ = [
    "REPO",
    "dev_args",
    "ensure_images",
    "ensure_tools",
    "has_idle_timeout_option",
    "has_sleep_mode",
    "has_start_boost",
    "wait_for_engine",
]

REPO = Path(__file__).resolve().parent.parent
TOOLS = {"wrk": "wrk", "nginx": "nginx"}  # command -> Debian package


async def wait_for_engine(within: float = 180.0) -> None:
    """Until ``docker info`` answers (the engine may be restarting), at most ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        proc = await asyncio.create_subprocess_exec(
            "docker", "info", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        if await proc.wait() == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Docker engine did not answer `docker info` within {within:g} s"
            )
        await asyncio.sleep(1)


def ensure_tools() -> None:
    missing = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"missing {', '.join(missing)}: sudo apt-get install -y {' '.join(missing)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env
    )


def ensure_images() -> None:
    """The local base images (built once; each script returns at once when present)."""
    for script in ("base-image", "python-base-image"):
        subprocess.run([str(REPO / "scripts" / script)], check=True, stdout=subprocess.DEVNULL)


def has_sleep_mode() -> bool:
    from dockyard import Container

    return hasattr(Container, "sleep_mode")


def has_start_boost() -> bool:
    from dockyard import Container

    return hasattr(Container, "start_boost")


def has_idle_timeout_option() -> bool:
    return _has_dev_option("object_idle_timeout")


def has_access_log_option() -> bool:
    return _has_dev_option("access_log")


def _has_dev_option(parameter: str) -> bool:
    from dockyard import cli

    return parameter in inspect.signature(cli.dev).parameters


def dev_args() -> tuple[str, ...]:
    """Options for every dockyard dev the bench runs: no access log, as nginx has none."""
    return ("--no-access-log",) if has_access_log_option() else ()
