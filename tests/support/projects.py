"""Projects for container tests: a wrangler config, a worker and Dockerfiles on disk."""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.engine import app_name

IMAGES = Path(__file__).parent / "images"

# One worker for every container test. Routes:
#   /c/<BINDING>/<name>/<path...>   forwards to that object's fetch with /<path...>
#   /rpc/<BINDING>/<name>/<method>  calls a method with the JSON body as arguments
#   /random/<BINDING>/<n>/<path...> forwards through get_random(binding, n)
WORKER = """
import json
import logging

from dockyard import Container, Request, Response, get_container, get_random

log = logging.getLogger("test-worker")


class Web(Container):
    default_port = 8080
    sleep_after = {sleep_after!r}

    async def on_start(self):
        log.info("on_start %s", self.ctx.id.name)

    async def on_stop(self, params):
        stops = await self.ctx.storage.get("stops") or []
        # Dockyard's finer reason; params.reason is Cloudflare's ("exit"/"runtime_signal").
        stops.append([params.exit_code, params.dockyard_reason])
        await self.ctx.storage.put("stops", stops)
        log.info("on_stop %s %s %s", self.ctx.id.name, params.exit_code, params.reason)

    async def stops(self):
        return await self.ctx.storage.get("stops") or []

    async def record(self, payload):
        runs = await self.ctx.storage.get("scheduled") or []
        runs.append(payload)
        await self.ctx.storage.put("scheduled", runs)

    async def scheduled(self):
        return await self.ctx.storage.get("scheduled") or []

    async def state(self):
        state = await self.get_state()
        return {{"status": state.status, "exit_code": state.exit_code}}

    async def run(self, cmd):
        result = await self.exec(cmd)
        return {{"exit_code": result.exit_code, "stdout": result.stdout.decode(),
                "stderr": result.stderr.decode()}}

    async def add_schedule(self, seconds, payload):
        row = await self.schedule(seconds, "record", payload)
        return row.id

    async def schedules(self):
        return [s.id for s in await self.list_schedules()]


class Quitter(Web):
    # Serves, and exits with code 3 once /tmp/quit appears.
    entrypoint = ["sh", "-c",
                  "httpd -p 8080 -h /www; while [ ! -f /tmp/quit ]; do sleep 0.05; done; exit 3"]


class BadEntry(Web):
    entrypoint = ["/no/such/program"]


class NoPort(Web):
    entrypoint = ["sleep", "600"]
    port_timeout = 2.0


class Hog(Web):
    # Allocates and touches 1 GiB as the container's main process.
    entrypoint = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1024M", "count=1"]


class Echo(Web):
    pass


class Outside(Web):
    # Listens on the container's external address only, not on its loopback.
    entrypoint = ["sh", "-c", 'exec httpd -f -p "$(hostname -i):8080" -h /www']


class Pauser(Web):
    sleep_mode = "pause"


class Broken(Web):
    pass


async def fetch(request, env, ctx):
    parts = request.path.strip("/").split("/")
    kind, binding = parts[0], getattr(env, parts[1])
    if kind == "rpc":
        stub = get_container(binding, parts[2])
        args = await request.json() if request.method == "POST" else []
        return Response.json(await getattr(stub, parts[3])(*args))
    if kind == "random":
        stub = get_random(binding, int(parts[2]))
    else:
        stub = get_container(binding, parts[2])
    url = "http://container/" + "/".join(parts[3:])
    if request.query_string:
        url += "?" + request.query_string
    body = request.stream() if request.has_body else None
    return await stub.fetch(Request(url, method=request.method, headers=request.headers, body=body))
"""

CLASSES = {
    "Web": "web",
    "Quitter": "web",
    "BadEntry": "web",
    "NoPort": "web",
    "Hog": "web",
    "Echo": "echo",
    "Outside": "web",
    "Pauser": "web",
    "Broken": "broken",
}


@dataclass
class Project:
    root: Path
    name: str
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return {"dockyard.app": self.name}


def make_project(
    root: Path,
    classes: dict[str, dict[str, Any]],
    *,
    sleep_after: str | int = "10m",
    base_images: dict[str, str] | None = None,
) -> Project:
    """A project with the given container classes (name -> extra container config keys)."""
    name = app_name()
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(WORKER.format(sleep_after=sleep_after))
    for image in {CLASSES[c] for c in classes}:
        target = root / image
        if image == "broken":
            target.mkdir(exist_ok=True)
            (target / "Dockerfile").write_text(
                "ARG BASE=dockyard/busybox:latest\nFROM ${BASE}\n"
                'RUN echo "about to fail" && exit 7\n'
            )
        else:
            shutil.copytree(IMAGES / image, target, dirs_exist_ok=True)
    containers = []
    for class_name, extra in classes.items():
        entry: dict[str, Any] = {
            "class_name": class_name,
            "image": f"./{CLASSES[class_name]}/Dockerfile",
        }
        base = (base_images or {}).get(CLASSES[class_name])
        if base:
            entry["image_vars"] = {"BASE": base}
        entry.update(extra)
        containers.append(entry)
    config = {
        "name": name,
        "main": "worker.py",
        "containers": containers,
        "durable_objects": {"bindings": [{"name": c.upper(), "class_name": c} for c in classes]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": list(classes)}],
    }
    (root / "wrangler.jsonc").write_text(textwrap.dedent(json.dumps(config, indent=2)))
    return Project(root, name, classes)
