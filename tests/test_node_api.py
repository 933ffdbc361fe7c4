"""The control-plane API (node/api.py, node/deploys.py) on a real loopback server.

The node behind it is a small `ApiNode` built here from the real store, secret box and
tokens in `tmp_path`; it records activations instead of starting app processes (that is
node.py's job, tested in test_platform_e2e). Container routes run on the real engine.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import secrets
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerSpec
from dockyard.errors import StartFailed
from dockyard.node.api import make_admin_app
from dockyard.node.paths import NodePaths
from dockyard.node.secrets import SecretBox
from dockyard.node.store import NodeStore, RolloutRecord
from dockyard.node.tokens import Tokens, hash_token

API = "/api/v1"
SECRET_VALUE = "sk_live_" + "Zq7" * 12  # something no response or log may ever contain


class ApiNode:
    """What the API needs of a node (`NodeControl`), with real state and a recorded
    `activate` in place of app processes."""

    def __init__(self, root: Path, *, runtime: Any = None, max_upload_bytes: int = 1 << 20):
        self.paths = NodePaths(root)
        self.paths.ensure()
        self.store = NodeStore(self.paths.db)
        self.secrets = SecretBox(self.paths.secret_key)
        self.tokens = Tokens(self.store)
        self.registry: Any = None  # worker-only deploys never ask it
        self.runtime = runtime
        self.owner = "node-" + secrets.token_hex(4)
        self.admin_address = "127.0.0.1:8788"
        self.max_upload_bytes = max_upload_bytes
        self.activations: list[tuple[str, int, str]] = []
        self.refuse_activation: Exception | None = None

    async def stop_container(self, info: Any) -> None:
        await self.runtime.stop(info.id)

    def tokens_rotated(self) -> None:
        self.rotations = getattr(self, "rotations", 0) + 1

    async def activate(self, app: str, number: int, strategy: str) -> RolloutRecord | None:
        self.activations.append((app, number, strategy))
        if self.refuse_activation is not None:
            raise self.refuse_activation
        self.store.set_active_version(app, number)
        if strategy == "none":
            return None
        # What the node's rollouts would start: saved, as they save every step.
        rollout = RolloutRecord(
            app, number, number - 1 or None, "running", [50, 100], 0, [], 2, 1.0, 1.0, None
        )
        self.store.save_rollout(rollout)
        return rollout

    async def delete_app(self, app: str) -> None:
        self.store.delete_app(app)

    def run_ref(self, image: str) -> str:
        return f"{self.registry.address}/{image}"


class Api:
    """A client for the served app: `await api.call(method, path, ...) -> (status, body)`."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.token = token
        self.last_deploy_id = ""

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "default",
        json_body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        sent = dict(headers or {})
        token = self.token if token == "default" else token
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": sent}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.base + path, **kwargs) as response:
            raw = await response.read()
        body = json.loads(raw) if raw and response.content_type == "application/json" else raw
        return response.status, body, response

    async def deploy(
        self, app: str, bundle: bytes, images: dict[str, str] | None = None, **finish: Any
    ) -> tuple[int, Any]:
        status, begun, _ = await self.call("POST", f"{API}/apps/{app}/deploys")
        assert status == 201, begun
        self.last_deploy_id = str(begun["deploy_id"])
        deploy = f"{API}/apps/{app}/deploys/{begun['deploy_id']}"
        status, uploaded, _ = await self.call(
            "PUT", f"{deploy}/bundle", data=bundle, headers={"Content-Type": "application/gzip"}
        )
        assert status == 200, uploaded
        body = {"images": images or {}, "rollout": "gradual", "message": "test"} | finish
        status, result, _ = await self.call("POST", f"{deploy}/finish", json_body=body)
        return status, result


def bundle(files: dict[str, str]) -> bytes:
    """A worker bundle as `dockyard deploy` uploads it: a tar.gz of the project."""
    out = io.BytesIO()
    # mtime 0 in the gzip header: the same files always give the same bytes (and hash).
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w") as tar,
    ):
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def worker_project(app: str, vars: dict[str, str], body: str = "ok") -> dict[str, str]:
    config = {"name": app, "main": "worker.py", "compatibility_date": "2026-11-01", "vars": vars}
    return {
        "wrangler.jsonc": json.dumps(config, indent=2) + "\n",
        "worker.py": (
            "from dockyard import Response\n\n\n"
            f"async def fetch(request, env):\n    return Response({body!r})\n"
        ),
    }


@pytest.fixture
def node(tmp_path: Path) -> ApiNode:
    return ApiNode(tmp_path / "data")


@pytest_asyncio.fixture
async def api(node: ApiNode) -> AsyncIterator[Api]:
    token = node.tokens.first_start(None)
    assert token is not None
    server = TestServer(make_admin_app(node), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(session, str(server.make_url("")).rstrip("/"), token)
    finally:
        await server.close()
        node.store.close()


def assert_error(body: Any, status: int, expected: int) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    assert isinstance(body["id"], str) and len(body["id"]) == 8


# -- auth -----------------------------------------------------------------------------------


async def test_health_is_open_and_everything_else_needs_a_token(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{API}/health", token=None)
    assert (status, body) == (200, {"status": "ok"})

    for token in (None, "dy_not-a-token"):
        status, body, response = await api.call("GET", f"{API}/node", token=token)
        assert_error(body, status, 401)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="dockyard"'
    status, body, response = await api.call(
        "GET", f"{API}/apps", token=None, headers={"Authorization": f"Basic {api.token}"}
    )
    assert_error(body, status, 401)

    status, body, _ = await api.call("GET", f"{API}/node")
    assert status == 200
    assert body["registry"] == "127.0.0.1:8788" and body["apps"] == 0


async def test_a_read_token_reads_but_may_not_change_anything(api: Api, node: ApiNode) -> None:
    read = "dy_" + secrets.token_urlsafe(32)
    node.store.add_token(hash_token(read), "read")
    status, body, _ = await api.call("GET", f"{API}/apps", token=read)
    assert (status, body) == (200, {"apps": []})
    for method, path in [
        ("POST", f"{API}/apps/shop/deploys"),
        ("PUT", f"{API}/apps/shop/secrets/KEY"),
        ("DELETE", f"{API}/apps/shop"),
        ("POST", f"{API}/tokens/rotate"),
    ]:
        status, body, _ = await api.call(method, path, token=read, json_body={"value": "x"})
        assert_error(body, status, 403)
    assert node.store.list_apps() == []


async def test_rotating_the_token_revokes_the_old_one(api: Api) -> None:
    status, body, _ = await api.call("POST", f"{API}/tokens/rotate")
    assert status == 200 and body["token"].startswith("dy_")
    status, old, _ = await api.call("GET", f"{API}/apps")
    assert_error(old, status, 401)
    status, _, _ = await api.call("GET", f"{API}/apps", token=body["token"])
    assert status == 200


# -- errors ---------------------------------------------------------------------------------


async def test_unknown_things_are_404_with_an_error_body(api: Api) -> None:
    for method, path in [
        ("GET", f"{API}/apps/nope"),
        ("GET", f"{API}/apps/nope/versions"),
        ("GET", f"{API}/apps/NOT..VALID"),
        ("DELETE", f"{API}/apps/nope"),
        ("POST", f"{API}/apps/nope/rollback"),
        ("DELETE", f"{API}/apps/nope/deploys/{'0' * 32}"),
        ("GET", f"{API}/no/such/route"),
    ]:
        status, body, _ = await api.call(method, path, json_body={})
        assert_error(body, status, 404)
    status, body, response = await api.call("PATCH", f"{API}/apps")
    assert_error(body, status, 405)
    assert response.headers["Allow"] == "GET,HEAD"


async def test_bad_bodies_are_422_with_field_errors(api: Api) -> None:
    status, begun, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    finish = f"{API}/apps/shop/deploys/{begun['deploy_id']}/finish"
    status, body, _ = await api.call("POST", finish, json_body={"rollout": "sideways"})
    assert_error(body, status, 422)
    assert [f["loc"] for f in body["fields"]] == [["body", "rollout"]]
    status, body, _ = await api.call("POST", finish, json_body={"images": {"Web": "latest"}})
    assert_error(body, status, 422)
    assert body["fields"][0]["loc"] == ["body", "images", "Web"]
    status, body, _ = await api.call("POST", finish, json_body={"imagez": {}})
    assert_error(body, status, 422)
    assert body["fields"][0]["loc"] == ["body", "imagez"]
    status, body, _ = await api.call(
        "POST", finish, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(body, status, 422)
    assert body["fields"] == [{"loc": ["body"], "msg": "invalid JSON"}]
    status, body, _ = await api.call("POST", f"{API}/apps/Bad_Name/deploys")
    assert_error(body, status, 422)
    assert body["fields"][0]["loc"] == ["path", "app"]


# -- deploys --------------------------------------------------------------------------------


async def test_deploys_create_versions_and_say_what_changed(api: Api, node: ApiNode) -> None:
    status, result = await api.deploy(
        "shop", bundle(worker_project("shop", {"GREETING": "hi", "OLD": "1"}))
    )
    assert status == 201, result
    assert result["version"]["number"] == 1 and result["version"]["active"]
    assert result["changes"][0] == "first version"
    assert "var GREETING added" in result["changes"] and "var OLD added" in result["changes"]
    assert result["rollout"]["version"] == 1 and result["rollout"]["state"] == "running"
    first_hash = result["version"]["bundle_hash"]
    assert result["version"]["config"]["main"] == "worker.py"

    status, result = await api.deploy(
        "shop",
        bundle(worker_project("shop", {"GREETING": "hello", "NEW": "2"}, body="v2")),
        rollout="immediate",
        message="second",
    )
    assert status == 201, result
    assert result["version"]["number"] == 2
    assert result["changes"] == [
        f"worker bundle changed ({first_hash[:12]} -> {result['version']['bundle_hash'][:12]})",
        "var GREETING changed",
        "var NEW added",
        "var OLD removed",
    ]
    assert node.activations == [("shop", 1, "gradual"), ("shop", 2, "immediate")]

    status, body, _ = await api.call("GET", f"{API}/apps/shop/versions")
    assert [(v["number"], v["active"], v["message"]) for v in body["versions"]] == [
        (2, True, "second"),
        (1, False, "test"),
    ]
    status, body, _ = await api.call("GET", f"{API}/apps/shop")
    assert body["active_version"] == 2 and body["versions"] == 2
    # The upload is gone once the version exists; the unpacked bundle stays.
    assert list(node.paths.uploads_dir.iterdir()) == []
    assert (node.paths.bundle_dir("shop", first_hash) / "worker.py").is_file()

    # The same code again: the bundle is reused, and the changes say nothing moved.
    status, result = await api.deploy(
        "shop", bundle(worker_project("shop", {"GREETING": "hello", "NEW": "2"}, body="v2"))
    )
    assert status == 201 and result["changes"] == ["worker bundle unchanged"]


async def test_a_second_deploy_gets_409_until_the_first_is_aborted(api: Api, node: ApiNode) -> None:
    status, first, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    assert status == 201
    assert first["registry"] == node.admin_address
    status, body, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    assert_error(body, status, 409)
    assert "another deploy of shop" in body["error"]

    deploy = f"{API}/apps/shop/deploys/{first['deploy_id']}"
    await api.call("PUT", f"{deploy}/bundle", data=b"partial")
    status, body, _ = await api.call("DELETE", deploy)
    assert status == 204
    assert list(node.paths.uploads_dir.iterdir()) == []
    status, body, _ = await api.call("DELETE", deploy)
    assert_error(body, status, 404)
    status, second, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    assert status == 201 and second["deploy_id"] != first["deploy_id"]
    assert node.store.get_app("shop") is None  # nothing was created


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_upload_over_the_limit_is_413_and_leaves_nothing(
    tmp_path: Path, declared: bool
) -> None:
    node = ApiNode(tmp_path / "data", max_upload_bytes=64 * 1024)
    token = node.tokens.first_start(None)
    server = TestServer(make_admin_app(node), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, str(server.make_url("")).rstrip("/"), str(token))
            status, begun, _ = await api.call("POST", f"{API}/apps/shop/deploys")
            path = f"{API}/apps/shop/deploys/{begun['deploy_id']}/bundle"
            payload = b"x" * (200 * 1024)

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(payload), 16 * 1024):
                    yield payload[start : start + 16 * 1024]

            status, body, _ = await api.call("PUT", path, data=payload if declared else chunks())
            assert_error(body, status, 413)
            assert "65536 bytes" in body["error"]
            assert list(node.paths.uploads_dir.iterdir()) == []
            # The deploy stays open: a bundle within the limit is taken.
            small = bundle(worker_project("shop", {}))
            status, body, _ = await api.call("PUT", path, data=small)
            assert status == 200 and body["size"] == len(small)
    finally:
        await server.close()
        node.store.close()


async def test_a_config_error_is_422_with_file_and_line_and_changes_nothing(
    api: Api, node: ApiNode, tmp_path: Path
) -> None:
    status, _ = await api.deploy("shop", bundle(worker_project("shop", {"A": "1"})))
    assert status == 201
    broken = worker_project("shop", {})
    broken["wrangler.jsonc"] = (
        '{\n  "name": "shop",\n  "main": "worker.py",\n  "compatibility_date": 5,\n}\n'
    )
    status, begun, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    deploy = f"{API}/apps/shop/deploys/{begun['deploy_id']}"
    await api.call("PUT", f"{deploy}/bundle", data=bundle(broken))
    status, body, _ = await api.call("POST", f"{deploy}/finish", json_body={})
    assert_error(body, status, 422)
    assert body["error"].startswith("wrangler.jsonc:4: compatibility_date: expected a date")
    assert body["fields"][0]["loc"] == ["config", "wrangler.jsonc", 4, "compatibility_date"]
    assert str(tmp_path) not in json.dumps(body)
    assert node.store.get_app("shop").active_version == 1  # type: ignore[union-attr]
    assert node.activations == [("shop", 1, "gradual")]
    # Failing before the version exists leaves the deploy open: the client aborts it.
    status, _, _ = await api.call("DELETE", deploy)
    assert status == 204


async def test_config_errors_name_paths_relative_to_the_bundle(api: Api, node: ApiNode) -> None:
    missing_main = worker_project("shop", {})
    missing_main["wrangler.jsonc"] = (
        '{\n  "name": "shop",\n  "main": "missing.py",\n  "compatibility_date": "2026-11-01"\n}\n'
    )
    status, body = await api.deploy("shop", bundle(missing_main))
    assert_error(body, status, 422)
    assert body["error"] == (
        'wrangler.jsonc:3: main: file "missing.py" not found (expected a Python file relative to .)'
    )
    assert str(node.paths.root) not in json.dumps(body)
    status, _, _ = await api.call("DELETE", f"{API}/apps/shop/deploys/{api.last_deploy_id}")
    assert status == 204

    status, body = await api.deploy("shop", bundle({"worker.py": "x = 1\n"}))
    assert_error(body, status, 422)
    assert body["error"] == "no wrangler.jsonc, wrangler.json or wrangler.toml in ."


async def test_a_bundle_for_another_app_or_without_its_images_is_refused(
    api: Api, node: ApiNode
) -> None:
    status, body = await api.deploy("shop", bundle(worker_project("other", {})))
    assert_error(body, status, 422)
    assert body["fields"][0]["loc"] == ["config", "name"]

    project = container_project("box")
    status, body = await api.deploy("box", bundle(project), images={"Api": "sha256:" + "a" * 64})
    assert_error(body, status, 422)
    assert sorted(f["loc"][-1] for f in body["fields"]) == ["Api", "Web"]
    assert node.store.get_app("box") is None


class HeldRegistry:
    """A registry that holds every manifest check until released (to abort meanwhile)."""

    address = "127.0.0.1:5000"

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        self.asked.set()
        await self.release.wait()
        return reference


class PullingRuntime:
    def __init__(self) -> None:
        self.pulled: list[str] = []

    async def pull(self, ref: str) -> str:
        self.pulled.append(ref)
        return "sha256:" + "1" * 64


def container_project(app: str) -> dict[str, str]:
    return {
        "wrangler.jsonc": json.dumps(
            {
                "name": app,
                "main": "worker.py",
                "compatibility_date": "2026-11-01",
                "containers": [{"class_name": "Web", "image": "./Dockerfile"}],
                "durable_objects": {"bindings": [{"class_name": "Web", "name": "WEB"}]},
                "migrations": [{"new_sqlite_classes": ["Web"], "tag": "v1"}],
            }
        ),
        "worker.py": "from dockyard import Container\n\n\nclass Web(Container):\n    pass\n",
        "Dockerfile": "FROM scratch\n",
    }


async def test_an_abort_during_a_finish_wins_and_nothing_changes(api: Api, node: ApiNode) -> None:
    node.registry = HeldRegistry()
    node.runtime = PullingRuntime()
    status, begun, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    deploy = f"{API}/apps/shop/deploys/{begun['deploy_id']}"
    await api.call("PUT", f"{deploy}/bundle", data=bundle(container_project("shop")))
    digest = "sha256:" + "c" * 64
    finish = asyncio.create_task(
        api.call("POST", f"{deploy}/finish", json_body={"images": {"Web": digest}})
    )
    try:
        await asyncio.wait_for(node.registry.asked.wait(), 10)
        status, _, _ = await api.call("DELETE", deploy)
        assert status == 204
    finally:
        node.registry.release.set()
        status, body, _ = await finish
    assert_error(body, status, 404)
    assert node.runtime.pulled == [f"127.0.0.1:5000/shop/web@{digest}"]
    assert node.store.get_app("shop") is None
    assert node.activations == []


async def test_an_activation_that_fails_keeps_the_old_version_and_hides_the_detail(
    api: Api, node: ApiNode, caplog: pytest.LogCaptureFixture
) -> None:
    await api.deploy("shop", bundle(worker_project("shop", {})))
    node.refuse_activation = StartFailed("exec /srv/node/apps/shop: permission denied")
    caplog.set_level(logging.INFO)
    status, body = await api.deploy("shop", bundle(worker_project("shop", {"A": "1"})))
    assert_error(body, status, 500)
    assert "version 2 was recorded but did not start" in body["error"]
    assert "the container did not start" in body["error"]
    assert "/srv/node" not in json.dumps(body)
    logged = [r for r in caplog.records if body["id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert node.store.get_app("shop").active_version == 1  # type: ignore[union-attr]
    # The version exists, so the deploy is over: a new one may begin.
    status, _, _ = await api.call("POST", f"{API}/apps/shop/deploys")
    assert status == 201


async def test_the_rollout_route_answers_the_latest_rollout_or_null(api: Api) -> None:
    await api.call("PUT", f"{API}/apps/shop/secrets/KEY", json_body={"value": "v"})
    status, body, _ = await api.call("GET", f"{API}/apps/shop/rollout")
    assert (status, body) == (200, None)
    status, result = await api.deploy("shop", bundle(worker_project("shop", {})))
    status, body, _ = await api.call("GET", f"{API}/apps/shop/rollout")
    assert status == 200 and body == result["rollout"]
    assert body == {
        "app": "shop",
        "version": 1,
        "from_version": None,
        "state": "running",
        "steps": [50, 100],
        "step": 0,
        "replaced": [],
        "total": 2,
        "started_at": 1.0,
        "updated_at": 1.0,
        "error": None,
    }


# -- rollback -------------------------------------------------------------------------------


async def test_rollback_makes_a_new_version_copying_the_target(api: Api, node: ApiNode) -> None:
    status, one = await api.deploy("shop", bundle(worker_project("shop", {"V": "1"})))
    status, two = await api.deploy("shop", bundle(worker_project("shop", {"V": "2"}, "two")))
    status, body, _ = await api.call("POST", f"{API}/apps/shop/rollback", json_body={})
    assert status == 201, body
    assert body["version"]["number"] == 3
    assert body["version"]["bundle_hash"] == one["version"]["bundle_hash"]
    assert body["version"]["vars"] == {"V": "1"}
    assert body["version"]["message"] == "rollback to version 1"
    assert body["changes"][0] == "rollback to version 1"
    assert "var V changed" in body["changes"]
    assert node.activations[-1] == ("shop", 3, "gradual")

    status, body, _ = await api.call(
        "POST", f"{API}/apps/shop/rollback", json_body={"version": 2, "rollout": "immediate"}
    )
    assert status == 201 and body["version"]["number"] == 4
    assert body["version"]["bundle_hash"] == two["version"]["bundle_hash"]
    assert node.activations[-1] == ("shop", 4, "immediate")

    status, body, _ = await api.call("POST", f"{API}/apps/shop/rollback", json_body={"version": 9})
    assert_error(body, status, 404)
    status, body, _ = await api.call("POST", f"{API}/apps/shop/rollback", json_body={"version": 4})
    assert_error(body, status, 409)
    status, body, _ = await api.call("POST", f"{API}/apps/shop/rollback", json_body={"version": 0})
    assert_error(body, status, 422)


# -- secrets --------------------------------------------------------------------------------


async def test_secrets_are_never_shown_or_logged(
    api: Api, node: ApiNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def call(*args: Any, **kwargs: Any) -> tuple[int, Any]:
        status, body, response = await api.call(*args, **kwargs)
        seen.append(json.dumps(body) if not isinstance(body, bytes) else body.decode())
        seen.append(json.dumps(dict(response.headers)))
        return status, body

    # Before the first deploy: stored, no version yet.
    status, body = await call(
        "PUT", f"{API}/apps/shop/secrets/API_KEY", json_body={"value": SECRET_VALUE}
    )
    assert status == 200, body
    assert body == {"name": "API_KEY", "version": None, "changes": ["secret API_KEY added"]}
    status, result = await api.deploy("shop", bundle(worker_project("shop", {})))
    seen.append(json.dumps(result))
    assert result["version"]["secret_names"] == ["API_KEY"]
    assert "secret API_KEY added" in result["changes"]

    # With an active version: each change is a new version, activated without a rollout.
    status, body = await call(
        "PUT", f"{API}/apps/shop/secrets/API_KEY", json_body={"value": SECRET_VALUE + "2"}
    )
    assert status == 200 and body["version"]["number"] == 2
    assert body["changes"] == ["worker bundle unchanged", "secret API_KEY changed"]
    status, body = await call(
        "PUT", f"{API}/apps/shop/secrets/DB_PASS", json_body={"value": SECRET_VALUE + "3"}
    )
    assert body["version"]["number"] == 3 and body["version"]["secret_names"] == [
        "API_KEY",
        "DB_PASS",
    ]
    status, body = await call("GET", f"{API}/apps/shop/secrets")
    assert body == {"secrets": ["API_KEY", "DB_PASS"]}
    status, body = await call("DELETE", f"{API}/apps/shop/secrets/DB_PASS")
    assert status == 200 and body["changes"] == [
        "worker bundle unchanged",
        "secret DB_PASS removed",
    ]
    status, body = await call("DELETE", f"{API}/apps/shop/secrets/DB_PASS")
    assert_error(body, status, 404)
    status, body = await call("PUT", f"{API}/apps/shop/secrets/9bad", json_body={"value": "x"})
    assert_error(body, status, 422)
    status, body = await call("PUT", f"{API}/apps/shop/secrets/BIG", json_body={"value": 5})
    assert_error(body, status, 422)
    for path in ("/apps/shop", "/apps/shop/versions", "/apps"):
        await call("GET", API + path)
    assert node.activations[1:] == [("shop", 2, "none"), ("shop", 3, "none"), ("shop", 4, "none")]

    assert caplog.records, "the API logs its changes"
    for text in seen + [record.getMessage() for record in caplog.records]:
        assert SECRET_VALUE not in text
    assert SECRET_VALUE.encode() not in node.paths.db.read_bytes()


async def test_the_deploy_clients_node_client_speaks_this_api(api: Api) -> None:
    """The seam with node/client.py: every app-level call of `NodeClient` on this API."""
    from dockyard.node.client import NodeClient, NodeError

    async with NodeClient(api.base, api.token) as client:
        assert (await client.health()) == {"status": "ok"}
        assert (await client.node())["apps"] == 0
        begun = await client.begin_deploy("shop")
        with pytest.raises(NodeError) as conflict:
            await client.begin_deploy("shop")
        assert conflict.value.status == 409 and conflict.value.error_id
        await client.upload_bundle("shop", begun["deploy_id"], bundle(worker_project("shop", {})))
        result = await client.finish_deploy(
            "shop", begun["deploy_id"], images={}, rollout="none", message="m"
        )
        assert result["version"]["number"] == 1
        await client.put_secret("shop", "KEY", SECRET_VALUE)
        assert await client.list_secrets("shop") == ["KEY"]
        assert [v["number"] for v in await client.list_versions("shop")] == [2, 1]
        assert (await client.rollback("shop"))["version"]["number"] == 3
        assert (await client.rollout("shop"))["version"] == 3  # type: ignore[index]
        assert [a["name"] for a in await client.list_apps()] == ["shop"]
        assert (await client.get_app("shop"))["active_version"] == 3
        await client.delete_secret("shop", "KEY")
        await client.delete_app("shop")
        with pytest.raises(NodeError) as missing:
            await client.get_app("shop")
        assert missing.value.status == 404


# -- containers (real engine) ---------------------------------------------------------------


@pytest.mark.docker
async def test_container_routes_see_only_this_nodes_containers(
    tmp_path: Path,
    docker_runtime: DockerRuntime,
    test_labels: dict[str, str],
    busybox_image: str,
) -> None:
    app = test_labels["dockyard.app"]
    node = ApiNode(tmp_path / "data", runtime=docker_runtime)
    token = node.tokens.first_start(None)
    node.store.ensure_app(app)
    script = "trap 'exit 0' TERM; echo one; echo two; while true; do sleep 1 & wait $!; done"
    ours = await docker_runtime.run(
        ContainerSpec(
            image=busybox_image,
            labels={**test_labels, "dockyard.owner": node.owner, "dockyard.class": "Web"},
            entrypoint=["sh", "-c", script],
        )
    )
    theirs = await docker_runtime.run(
        ContainerSpec(
            image=busybox_image,
            labels={**test_labels, "dockyard.owner": "node-someone-else"},
            entrypoint=["sh", "-c", script],
        )
    )
    server = TestServer(make_admin_app(node), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, str(server.make_url("")).rstrip("/"), str(token))
            status, body, _ = await api.call("GET", f"{API}/apps/{app}/containers")
            assert status == 200
            assert [c["id"] for c in body["containers"]] == [ours.id]
            assert body["containers"][0]["class_name"] == "Web"

            status, body, _ = await api.call("GET", f"{API}/containers/{ours.id}")
            assert status == 200 and body["app"] == app and body["running"]
            for route in ("", "/logs"):
                status, body, _ = await api.call("GET", f"{API}/containers/{theirs.id}{route}")
                assert_error(body, status, 404)
            for route in ("/stop", "/exec"):
                status, body, _ = await api.call(
                    "POST", f"{API}/containers/{theirs.id}{route}", json_body={"cmd": ["true"]}
                )
                assert_error(body, status, 404)

            status, body, _ = await api.call(
                "POST", f"{API}/containers/{ours.id}/exec", json_body={"cmd": ["echo", "hi"]}
            )
            assert (status, body) == (200, {"exit_code": 0, "stdout": "hi\n", "stderr": ""})

            async def logs_say_two() -> list[str] | None:
                status, body, _ = await api.call("GET", f"{API}/containers/{ours.id}/logs")
                return body["lines"] if status == 200 and "two" in body["lines"] else None

            assert await _until(logs_say_two) == ["one", "two"]
            status, body, _ = await api.call("GET", f"{API}/containers/{ours.id}/logs?tail=x")
            assert_error(body, status, 422)

            # follow=1 streams lines as text until the container stops.
            url = f"{api.base}{API}/containers/{ours.id}/logs?follow=1"
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                assert await response.content.readline() == b"one\n"
                assert await response.content.readline() == b"two\n"
                status, body, _ = await api.call("POST", f"{API}/containers/{ours.id}/stop")
                assert status == 200 and body == {"id": ours.id, "stopped": True}
                rest = await asyncio.wait_for(response.content.read(), 20)
                assert rest == b""
            info = await docker_runtime.inspect(theirs.id)
            assert info is not None and info.running
    finally:
        await server.close()
        node.store.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("docker-registry") is None, reason="no docker-registry binary: run scripts/setup"
)
async def test_a_deploy_with_a_container_class_checks_and_pulls_its_image(
    tmp_path: Path,
    docker_runtime: DockerRuntime,
    test_labels: dict[str, str],
    busybox_image: str,
) -> None:
    """The whole image path: push through the admin listener's /v2/ proxy into the real
    registry, finish names the digest, the node checks the manifest and pulls it."""
    from dockyard.node.registry import Registry

    app = test_labels["dockyard.app"]
    node = ApiNode(tmp_path / "data", runtime=docker_runtime)
    token = str(node.tokens.first_start(None))
    registry = Registry(node.paths.registry_dir)
    await registry.start()
    node.registry = registry
    server = TestServer(make_admin_app(node), host="127.0.0.1")
    await server.start_server()
    admin = f"127.0.0.1:{server.port}"
    node.admin_address = admin
    pushed = f"{admin}/{app}/web:test"
    pulled: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, f"http://{admin}", token)
            status, begun, _ = await api.call(
                "POST", f"{API}/apps/{app}/deploys", json_body={"classes": ["Web"]}
            )
            assert status == 201 and begun["repositories"] == {"Web": f"{app}/web"}
            assert begun["registry"] == admin
            # The registry behind the admin listener wants the token too.
            async with session.get(f"http://{admin}/v2/") as response:
                assert response.status == 401
            await docker_runtime.tag(busybox_image, pushed)
            digest = await docker_runtime.push(pushed, {"username": "x", "password": token})
            pulled.append(node.run_ref(f"{app}/web@{digest}"))  # removed at the end

            project = container_project(app)
            deploy = f"{API}/apps/{app}/deploys/{begun['deploy_id']}"
            await api.call("PUT", f"{deploy}/bundle", data=bundle(project))
            # A digest the registry does not have is refused, naming the class.
            status, body, _ = await api.call(
                "POST", f"{deploy}/finish", json_body={"images": {"Web": "sha256:" + "0" * 64}}
            )
            assert_error(body, status, 422)
            assert body["fields"][0]["loc"] == ["body", "images", "Web"]
            status, body, _ = await api.call(
                "POST", f"{deploy}/finish", json_body={"images": {"Web": digest}}
            )
            assert status == 201, body
            image = f"{app}/web@{digest}"
            assert body["version"]["images"] == {"Web": image}
            assert body["changes"][2] == f"container class Web added ({digest[:19]})"
            assert await docker_runtime.image_id(node.run_ref(image)) is not None

            status, body, _ = await api.call("GET", f"{API}/images")
            assert status == 200
            assert [(i["repo"], i["digest"], i["referenced"]) for i in body["images"]] == [
                (f"{app}/web", digest, True)
            ]
            status, body, _ = await api.call("POST", f"{API}/images/prune")
            assert status == 200 and body == {"deleted": [], "kept": 1}
    finally:
        await server.close()
        await registry.stop()
        node.store.close()
        refs = [pushed, *pulled]
        proc = await asyncio.create_subprocess_exec(
            "docker",
            "image",
            "rm",
            *refs,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()


async def _until(check: Any, within: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await check()
        if found is not None:
            return found
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
