"""``dockyard serve``: run a node until SIGTERM or Ctrl-C, then drain and exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from rich.console import Console

from .._limits import raise_open_file_limit
from ..errors import DockyardError
from ..settings import NodeSettings
from .dev import configure_logging

console = Console(stderr=True)
log = logging.getLogger("dockyard.serve")


def parse_address(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``, or just ``PORT`` on loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DockyardError(f"{option}: expected HOST:PORT, got {value!r}")
    return host, int(port)


def run_serve(settings: NodeSettings) -> int:
    configure_logging()
    raise_open_file_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(_serve(settings))
    return uvloop.run(_serve(settings))


async def _serve(settings: NodeSettings) -> int:
    from ..node.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    node = Node(settings)
    try:
        await node.start()
        if node.first_token is not None:
            # Shown this once; the node keeps only its hash.
            console.print(
                "[bold]Admin token[/] (shown once; `dockyard login` asks for it):\n"
                f"  {node.first_token}",
                highlight=False,
            )
        host = settings.listen[0]
        console.print(
            f"[bold green]Ready[/] apps on http://{host}:{node.listen_port} "
            f"(<app>.{settings.domain}), control plane and registry on "
            f"http://{node.admin_address}, data in {Path(settings.data_dir)}",
            highlight=False,
        )
        await stop.wait()
        console.print("Draining…")
    finally:
        await node.stop()
    return 0
