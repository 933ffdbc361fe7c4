"""Observability through a real ``dockyard serve``: container and worker lines in the log
store and the live tail (API and CLI), platform events with their numbers, ``/metrics``
read by Prometheus's own parser, and metered usage with a cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import DOCKYARD, Node, room_app, running_node
from tests.support.output import Output

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Every series docs/observability.md documents, by family name (the parser drops
# _total from counters).
DOCUMENTED = {
    "dockyard_requests",
    "dockyard_request_duration_seconds",
    "dockyard_container_request_duration_seconds",
    "dockyard_cold_start_duration_seconds",
    "dockyard_container_start_failures",
    "dockyard_container_stops",
    "dockyard_containers",
    "dockyard_objects_live",
    "dockyard_storage_bytes",
    "dockyard_rollouts_in_progress",
    "dockyard_container_cpu_seconds",
    "dockyard_container_memory_bytes",
    "dockyard_container_network_transmit_bytes",
    "dockyard_log_records",
    "dockyard_log_bytes",
    "dockyard_log_dropped",
}


@pytest.fixture
def node() -> Iterator[Node]:
    with running_node() as running:
        yield running


def chatty_project(tmp_path: Path, marker: str) -> Path:
    """A worker that prints and logs, and a container that prints once on each stream."""
    return room_app(
        tmp_path,
        f'["sh", "-c", "echo booted {marker}; echo warming {marker} >&2; '
        'exec httpd -f -p 8080 -h /www"]',
        before_fetch=(
            f"    print('worker saw {marker}')\n"
            f"    logging.getLogger('app').warning('careful {marker}')\n"
        ),
    )


async def get(node: Node, host: str, path: str = "/") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(node.app_url + path, headers={"Host": host}) as response,
    ):
        return response.status, await response.text()


class Tail:
    """``dockyard tail APP --json`` in a subprocess, its records collected as they come."""

    def __init__(self, node: Node, app: str) -> None:
        env = {"DOCKYARD_SERVER": node.admin_url, "DOCKYARD_TOKEN": node.token}
        self.proc = subprocess.Popen(
            [*DOCKYARD, "tail", app, "--json", "--lines", "50"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        self.output = Output(self.proc)

    def wait_for(self, match: Any, timeout: float) -> tuple[float, dict[str, Any]]:
        """The first record `match` accepts, and when it came (monotonic)."""
        times = self.output.times

        def record(line: str) -> tuple[float, dict[str, Any]] | None:
            try:
                parsed = json.loads(line)
            except ValueError:
                return None  # the CLI's own message on stderr, shown if the wait fails
            return (times[self.output.lines.index(line)], parsed) if match(parsed) else None

        return self.output.wait_for(record, timeout, "tail never showed it")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.output.close()


def test_logs_events_tail_metrics_and_usage(node: Node, tmp_path: Path) -> None:
    marker = secrets.token_hex(4)
    root = chatty_project(tmp_path, marker)
    app = root.name
    node.deploy(str(root))
    tail = Tail(node, app)
    try:
        # The backlog comes after the tail subscribed: once the deploy event is shown,
        # every later record reaches it live.
        tail.wait_for(lambda r: r.get("event") == "deploy", timeout=30)
        asked = time.monotonic()
        status, body = asyncio.run(get(node, f"{app}.localhost"))
        assert (status, body.strip()) == (200, "hi")

        # Live, within 2 s of the line being printed (the request returns after boot).
        at, booted = tail.wait_for(lambda r: r.get("message") == f"booted {marker}", timeout=10)
        assert at - asked < 10
        assert booted["source"] == "container" and booted["stream"] == "stdout"
        assert booted["class_name"] == "Web" and booted["object_name"] == "room-1"
        assert booted["container_id"] and booted["version"] == 1  # the deploy's number
        _, warming = tail.wait_for(lambda r: r.get("message") == f"warming {marker}", 10)
        assert warming["stream"] == "stderr"
        _, worker = tail.wait_for(lambda r: r.get("message") == f"worker saw {marker}", 10)
        assert worker["source"] == "worker" and worker["version"] == 1
        _, logged = tail.wait_for(lambda r: f"careful {marker}" in r.get("message", ""), 10)
        assert logged["level"] == "warning"
    finally:
        tail.close()

    # History: the same lines, and the platform's events with their numbers.
    done = node.cli("logs", app, "--json", "--source", "platform")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert "deploy" in kinds and "container.start" in kinds, events
    start = next(e for e in events if e["event"] == "container.start")
    assert start["fields"]["cold_start_ms"] > 0 and start["object_name"] == "room-1"
    done = node.cli("logs", app, "--grep", f"booted {marker}")
    assert done.returncode == 0 and f"booted {marker}" in done.stdout, done.stderr
    assert "Web/room-1" in done.stdout
    status, body = node.api("GET", f"/logs?app={app}&level=warning")
    assert status == 200
    assert any(f"careful {marker}" in r["message"] for r in body["records"]), body
    assert all(r["level"] in ("warning", "error") for r in body["records"]), body
    status, body = node.api("GET", f"/logs?app={app}&level=loud")
    assert status == 422 and "level" in body["error"]

    # /metrics: Prometheus's own parser reads every documented series.
    status, text = asyncio.run(
        _plain_get(node.admin_url + "/metrics", {"Authorization": f"Bearer {node.token}"})
    )
    assert status == 200, text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert DOCUMENTED <= set(families), DOCUMENTED - set(families)
    requests = {
        s.labels["code"]: s.value
        for s in families["dockyard_requests"].samples
        if s.labels.get("app") == app and s.name.endswith("_total")
    }
    assert requests.get("2xx") == 1, requests
    cold = [
        s
        for s in families["dockyard_cold_start_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels.get("class_name") == "Web"
    ]
    assert cold and cold[0].value == 1
    status, _ = asyncio.run(_plain_get(node.admin_url + "/metrics"))
    assert status == 401

    # Usage: the running container is metered, with a cost.
    deadline = time.monotonic() + 30
    while True:
        status, usage = node.api("GET", f"/usage?app={app}&by=class")
        assert status == 200, usage
        rows = usage["rows"]
        if rows and rows[0]["running_seconds"] > 0 and usage["total_usd"] > 0:
            break
        assert time.monotonic() < deadline, usage
        time.sleep(1)
    assert rows[0]["key"] == "Web" and rows[0]["memory_gib_seconds"] > 0

    # A stop through the API is recorded with its exit code and Cloudflare's reason.
    status, listed = node.api("GET", f"/apps/{app}/containers")
    (container,) = listed["containers"]
    status, _ = node.api("POST", f"/containers/{container['id']}/stop")
    assert status == 200
    deadline = time.monotonic() + 30
    while True:
        status, body = node.api("GET", f"/logs?app={app}&source=platform")
        stops = [r for r in body["records"] if r["event"] == "container.stop"]
        if stops:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    assert stops[0]["fields"]["reason"] == "runtime_signal"
    assert stops[0]["fields"]["exit_code"] is not None


async def _plain_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.text()


def test_a_node_killed_mid_run_neither_loses_nor_doubles_it(node: Node, tmp_path: Path) -> None:
    """SIGKILL the node while a container runs, start it again: the container is adopted
    and metered as one run covering its whole life, the lines printed meanwhile are kept."""
    marker = secrets.token_hex(4)
    root = room_app(
        tmp_path,
        f'["sh", "-c", "echo booted {marker}; (sleep 4; echo while-down {marker}) & '
        'exec httpd -f -p 8080 -h /www"]',
    )
    app = root.name
    node.deploy(str(root))
    began = time.monotonic()
    assert asyncio.run(get(node, f"{app}.localhost"))[0] == 200
    node.stop(signal.SIGKILL)
    time.sleep(3)  # the container runs on while no node watches it
    node.start()

    # The line printed while the node was down is there, once.
    deadline = time.monotonic() + 30
    while True:
        status, body = node.api("GET", f"/logs?app={app}&grep=while-down")
        if body["records"]:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    status, body = node.api("GET", f"/logs?app={app}&source=container")
    messages = [r["message"] for r in body["records"]]
    assert messages.count(f"booted {marker}") == 1, messages
    assert messages.count(f"while-down {marker}") == 1, messages

    status, listed = node.api("GET", f"/apps/{app}/containers")
    (container,) = listed["containers"]
    status, _ = node.api("POST", f"/containers/{container['id']}/stop")
    assert status == 200
    lived = time.monotonic() - began
    deadline = time.monotonic() + 30
    while True:
        status, usage = node.api("GET", f"/usage?app={app}&by=object")
        rows = usage["rows"]
        status, listed = node.api("GET", f"/apps/{app}/containers")
        if rows and not listed["containers"]:
            break
        assert time.monotonic() < deadline, usage
        time.sleep(0.5)
    (row,) = rows
    assert row["runs"] == 1, rows
    # The whole life, not the part after the restart, and not twice.
    assert lived - 2.0 <= row["running_seconds"] <= lived + 1.0, (lived, row)


def test_an_open_tail_does_not_hold_up_a_stopping_node(node: Node, tmp_path: Path) -> None:
    """SIGTERM with `dockyard tail` connected: the tail ends and the node exits at once,
    not after the listener's shutdown timeout."""
    app = f"t-{secrets.token_hex(4)}"
    (tmp_path / app).mkdir()
    (tmp_path / app / "worker.py").write_text(
        "from dockyard import Response\n\n\nasync def fetch(request, env, ctx):\n"
        "    return Response('ok')\n"
    )
    (tmp_path / app / "wrangler.jsonc").write_text(json.dumps({"name": app, "main": "worker.py"}))
    node.deploy(str(tmp_path / app))
    tail = Tail(node, app)
    tail.wait_for(lambda r: r.get("event") == "deploy", timeout=30)  # connected
    began = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - began < 20, node.output[-2000:]
    assert tail.proc.wait(10) is not None
    tail.close()
