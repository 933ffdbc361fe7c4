"""Restarts and crashes across real processes (tests/support/objects_server.py)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.support.objects_helpers import wait_for

SERVER = Path(__file__).parent / "support" / "objects_server.py"


@asynccontextmanager
async def server(state_dir: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), str(state_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}", process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_restart_across_processes(tmp_path: Path) -> None:
    async with server(tmp_path) as (url, process), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/put/a/k", data="v1") as response:
            assert response.status == 200
        due = (time.time() + 0.3) * 1000
        async with http.post(f"{url}/alarm/a", params={"at": str(due)}) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
    await wait_for(lambda: time.time() * 1000 > due + 50)  # the alarm falls in the downtime
    async with server(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/get/a/k") as response:
            assert await response.text() == "v1"
        fired: dict[str, object] = {}

        async def poll() -> None:
            while True:
                async with http.get(f"{url}/alarms/a") as response:
                    fired.update(await response.json())
                if fired["fired"] == 1 and fired["alarm"] is None:
                    return
                await asyncio.sleep(0.02)

        async with asyncio.timeout(10):
            await poll()
    async with server(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/alarms/a") as response:
            assert await response.json() == {"fired": 1, "alarm": None}


async def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    acknowledged: dict[str, set[str]] = {f"o{i}": set() for i in range(4)}

    async with server(tmp_path) as (url, process), aiohttp.ClientSession() as http:

        async def writer(name: str) -> None:
            n = 0
            while True:
                key = f"k{n:06d}"
                async with http.post(f"{url}/put/{name}/{key}", data=key) as response:
                    if response.status == 200:
                        acknowledged[name].add(key)
                n += 1

        writers = [asyncio.ensure_future(writer(name)) for name in acknowledged]
        await wait_for(lambda: min(map(len, acknowledged.values())) >= 100, within=20)
        process.send_signal(signal.SIGKILL)  # while writes are in flight
        results = await asyncio.gather(*writers, return_exceptions=True)
        assert all(isinstance(r, aiohttp.ClientError) for r in results), results
    total = sum(map(len, acknowledged.values()))
    async with server(tmp_path) as (url, _), aiohttp.ClientSession() as http:
        for name, keys in acknowledged.items():
            async with http.get(f"{url}/keys/{name}") as response:
                stored = set(await response.json())
            assert keys <= stored, sorted(keys - stored)[:5]
    print(f"\n{total} acknowledged writes survived SIGKILL")
