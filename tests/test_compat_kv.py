"""Workers KV (`kv_namespaces`) as Cloudflare's Python examples use it, on local SQLite."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from dockyard.bindings import KvNamespace
from dockyard.errors import BindingError
from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

TEXT = "text/plain;charset=UTF-8"

KV_WORKER = """
import json
import time

from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        kv = self.env.FOO
        path = request.path
        if path == "/example":  # Cloudflare's 02-binding example
            await kv.put("bar", "baz")
            bar = await kv.get("bar")
            return Response(bar)
        if path == "/put":
            key = request.query["key"]
            await kv.put(key, await request.text(), metadata={"by": "test"})
            return Response("stored")
        if path == "/get":
            value = await kv.get(request.query["key"], request.query.get("type", "text"))
            if isinstance(value, bytes):
                return Response(value, headers={"content-type": "application/octet-stream"})
            return Response.json(value)
        if path == "/meta":
            got = await kv.getWithMetadata(request.query["key"], "json")
            return Response.json({"value": got.value, "metadata": got["metadata"]})
        if path == "/delete":
            await kv.delete(request.query["key"])
            return Response("deleted")
        if path == "/list":
            options = {k: (int(v) if k == "limit" else v) for k, v in request.query.items()}
            listing = await kv.list(**options)
            return Response.json(listing)
        if path == "/ttl":
            await kv.put("short", "x", expirationTtl=30)
            return Response("accepted")
        if path == "/expiring":
            at = int(time.time()) + 3600
            await kv.put("later", "x", expiration=at)
            return Response.json({"at": at, "listed": (await kv.list(prefix="lat")).keys})
        if path == "/bad-value":
            try:
                await kv.put("k", {"an": "object"})
            except TypeError as exc:
                return Response(str(exc), status=400)
        return Response("?", status=404)
"""

KV_CONFIG = {"kv_namespaces": [{"binding": "FOO", "id": "0f2ac74b498b48028cb68387c421e279"}]}


async def test_kv_get_put_delete_list_through_dev(tmp_path: Path) -> None:
    project = cf_project(tmp_path, KV_WORKER, KV_CONFIG)
    with DevServer(project) as server:
        url = server.url
        assert (await request(url + "/example"))[:3] == (200, TEXT, b"baz")
        for key, value in (("user:1", '{"n": 1}'), ("user:2", '"two"'), ("other", "[]")):
            assert (await request(f"{url}/put?key={key}", "POST", data=value))[0] == 200
        assert (await request(url + "/get?key=user:1&type=json"))[:3] == (
            200,
            "application/json",
            b'{"n": 1}',
        )
        assert (await request(url + "/get?key=user:2"))[2] == b'"\\"two\\""'
        assert (await request(url + "/get?key=user:1&type=bytes"))[2] == b'{"n": 1}'
        assert (await request(url + "/get?key=missing"))[2] == b"null"
        _, _, body, _ = await request(url + "/meta?key=user:1")
        assert json.loads(body) == {"value": {"n": 1}, "metadata": {"by": "test"}}

        _, kind, body, _ = await request(url + "/list?prefix=user:&limit=1")
        first = json.loads(body)
        assert kind == "application/json"
        assert first["keys"] == [{"name": "user:1", "metadata": {"by": "test"}}]
        assert first["list_complete"] is False and first["cursor"]
        _, _, body, _ = await request(f"{url}/list?prefix=user:&limit=1&cursor={first['cursor']}")
        second = json.loads(body)
        assert [k["name"] for k in second["keys"]] == ["user:2"]
        assert second["list_complete"] is True and "cursor" not in second
        _, _, body, _ = await request(url + "/list")
        assert [k["name"] for k in json.loads(body)["keys"]] == ["bar", "other", "user:1", "user:2"]

        assert (await request(url + "/delete?key=user:1"))[2] == b"deleted"
        assert (await request(url + "/get?key=user:1"))[2] == b"null"
        # Cloudflare's floor: an expiration TTL under 60 s is refused.
        status, _, body, _ = await request(url + "/ttl")
        assert status == 500 and b"Expiration TTL must be at least 60" not in body
        server.wait_for("Invalid expiration_ttl of 30. Expiration TTL must be at least 60")
        _, _, body, _ = await request(url + "/expiring")
        expiring = json.loads(body)
        assert expiring["listed"] == [{"name": "later", "expiration": expiring["at"]}]
        assert (await request(url + "/bad-value"))[:3] == (
            400,
            TEXT,
            b"KV put() takes a str or bytes value, got dict (use json.dumps for objects)",
        )
    # A restart keeps what was stored, under .dockyard/kv/.
    assert (tmp_path / ".dockyard" / "kv" / "0f2ac74b498b48028cb68387c421e279.sqlite").is_file()
    with DevServer(project) as server:
        assert (await request(server.url + "/get?key=user:2&type=json"))[2] == b'"two"'


async def test_expired_keys_read_as_missing_and_leave_listings(tmp_path: Path) -> None:
    # The 60 s floor is lowered to 1 s here so expiry itself can be watched in real time.
    kv = KvNamespace(tmp_path / "kv.sqlite", name="T", min_ttl=1)
    try:
        await kv.put("soon", "a", expiration_ttl=1, metadata={"m": 1})
        await kv.put("kept", "b")
        assert await kv.get("soon") == "a"
        listed = (await kv.list()).keys
        expiration = listed[1]["expiration"]
        assert expiration in (int(time.time()), int(time.time()) + 1)
        assert listed == [
            {"name": "kept"},
            {"name": "soon", "expiration": expiration, "metadata": {"m": 1}},
        ]
        # Waiting for the wall clock to reach the expiration is the condition under test.
        await asyncio.sleep(max(expiration - time.time(), 0) + 0.01)
        assert await kv.get("soon") is None
        assert (await kv.get_with_metadata("soon")).value is None
        assert [k.name for k in (await kv.list()).keys] == ["kept"]
        with pytest.raises(BindingError, match="at least 1 seconds in the future"):
            await kv.put("past", "x", expiration=time.time() - 5)
    finally:
        kv.close()


async def test_kv_key_and_size_limits(tmp_path: Path) -> None:
    kv = KvNamespace(tmp_path / "kv.sqlite", name="T")
    try:
        with pytest.raises(BindingError, match="keys are at most 512 bytes"):
            await kv.put("k" * 513, "x")
        with pytest.raises(BindingError, match="not allowed"):
            await kv.put("..", "x")
        with pytest.raises(BindingError, match="the limit is 1024"):
            await kv.put("k", "x", metadata={"m": "x" * 1100})
        with pytest.raises(BindingError, match="limit must be 1-1000"):
            await kv.list(limit=1001)
        await kv.put("ключ/ü", "unicode keys are fine")
        assert await kv.get(["ключ/ü", "missing"]) == {
            "ключ/ü": "unicode keys are fine",
            "missing": None,
        }
        assert [k.name for k in (await kv.list(prefix="клю")).keys] == ["ключ/ü"]
    finally:
        kv.close()
