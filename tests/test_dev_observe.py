"""What ``dockyard dev`` shows of its containers: their lines on the console prefixed by
class and object, the platform's events, ``/metrics`` and the dashboard on their own
listener, and the same log store a node has, in the project's state folder.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockyard.observe.logstore import LogStore
from dockyard.observe.records import LogQuery
from tests.support.devserver import DevServer
from tests.support.engine import app_name

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DASHBOARD = re.compile(r"Dashboard on (http://[\d.]+:\d+)/ui/ \(token (\S+)\)")


def chatty(tmp_path: Path, marker: str) -> Path:
    root = tmp_path / "chatty"
    (root / "container").mkdir(parents=True)
    (root / "container" / "Dockerfile").write_text(
        "FROM dockyard/busybox:latest\nRUN mkdir /www && echo hi > /www/index.html\n"
        f'EXPOSE 8080\nCMD ["sh", "-c", "echo booted {marker}; exec httpd -f -p 8080 -h /www"]\n'
    )
    (root / "worker.py").write_text(
        "from dockyard import Container, get_container\n\n\n"
        "class Web(Container):\n    default_port = 8080\n\n\n"
        "async def fetch(request, env, ctx):\n"
        "    return await get_container(env.WEB, 'room-1').fetch(request)\n"
    )
    (root / "wrangler.jsonc").write_text(
        json.dumps(
            {
                "name": app_name("chatty"),
                "main": "worker.py",
                "containers": [{"class_name": "Web", "image": "./container/Dockerfile"}],
                "durable_objects": {"bindings": [{"name": "WEB", "class_name": "Web"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web"]}],
            }
        )
    )
    return root


async def fetch(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, str(response.url), await response.text()


def test_dev_console_metrics_dashboard_and_log_store(tmp_path: Path) -> None:
    marker = secrets.token_hex(4)
    root = chatty(tmp_path, marker)
    dev = DevServer(root).start()
    try:
        panel, _token = dev.wait_for(DASHBOARD).groups()
        status, _, body = asyncio.run(fetch(dev.url + "/"))
        assert (status, body.strip()) == (200, "hi")
        # The container's own line, prefixed by its class and object.
        dev.wait_for(re.escape(f"[Web/room-1] booted {marker}"), timeout=20)
        dev.wait_for(r"\[Web/room-1\] container\.start: container started in \d+ ms")

        status, _, text = asyncio.run(fetch(panel + "/metrics"))
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        served = [
            s.value
            for s in families["dockyard_requests"].samples
            if s.name.endswith("_total") and s.labels["code"] == "2xx"
        ]
        assert served == [1.0]
        assert "dockyard_cold_start_duration_seconds" in families

        # The dashboard asks for its login first.
        status, url, page = asyncio.run(fetch(panel + "/ui/"))
        assert status == 200 and "/ui/login" in url and 'name="token"' in page
    finally:
        dev.stop()

    async def stored() -> list[str]:
        async with LogStore(root / ".dockyard" / "logs.db") as store:
            return [r.message for r in store.query(LogQuery(source="container"))]

    assert f"booted {marker}" in asyncio.run(stored())
