"""Capacity and start-rate rules of the ContainerManager: pure logic, on a small fake engine.

The same rules are exercised on the real engine in test_containers.py (503 beyond
max_instances); the fake makes the start rate (429) testable without racing the clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockyard.config import load_config
from dockyard.containers.manager import ContainerManager
from dockyard.containers.runtime import ContainerInfo, ContainerSpec, RuntimeCapabilities
from dockyard.errors import NoCapacity, TooManyStarts
from dockyard.settings import ContainerSettings


class FakeRuntime:
    """Just enough engine for the manager: every run succeeds at once."""

    capabilities = RuntimeCapabilities(disk_limit=False, internet_isolation=False)

    def __init__(self) -> None:
        self.started: list[ContainerSpec] = []
        self.listed: list[dict[str, str]] = []

    async def image_id(self, ref: str) -> str | None:
        return "sha256:" + "ab12" * 16

    async def list(self, labels: dict[str, str]) -> list[ContainerInfo]:
        self.listed.append(dict(labels))
        return []

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        self.started.append(spec)
        return ContainerInfo(
            id=f"c{len(self.started)}",
            name=f"fake-{len(self.started)}",
            image=spec.image,
            labels=dict(spec.labels),
            status="running",
            running=True,
            exit_code=None,
            oom_killed=False,
            host_ports={port: 40000 + port for port in spec.ports},
            started_at=None,
            finished_at=None,
        )


def make_manager(tmp_path: Path, *, max_instances: int, starts_per_second: int) -> ContainerManager:
    (tmp_path / "worker.py").write_text("class Box:\n    pass\n")
    (tmp_path / "wrangler.json").write_text(
        json.dumps(
            {
                "name": "limits",
                "main": "worker.py",
                "containers": [
                    {"class_name": "Box", "image": "local/box:1", "max_instances": max_instances}
                ],
                "durable_objects": {"bindings": [{"name": "BOX", "class_name": "Box"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Box"]}],
            }
        )
    )
    runtime = FakeRuntime()
    return ContainerManager(
        runtime,  # type: ignore[arg-type]
        load_config(tmp_path),
        ContainerSettings(starts_per_second=starts_per_second),
        owner="test-owner",
    )


async def launch(
    manager: ContainerManager,
    object_id: str,
    name: str | None = None,
    *,
    env: dict[str, str] | None = None,
    entrypoint: list[str] | None = None,
    enable_internet: bool = True,
    boost: bool = False,
) -> ContainerInfo:
    return await manager.launch(
        manager.supervisor("Box", object_id, name),
        env=env or {},
        entrypoint=entrypoint,
        enable_internet=enable_internet,
        ports=[8080],
        boost=boost,
    )


async def test_max_instances_gives_no_capacity_until_one_exits(tmp_path: Path) -> None:
    manager = make_manager(tmp_path, max_instances=2, starts_per_second=100)
    await manager.start()
    first = await launch(manager, "object-0")
    await launch(manager, "object-1")
    with pytest.raises(NoCapacity, match=r"max_instances \(2\) reached .*'Box'") as caught:
        await launch(manager, "object-2")
    assert caught.value.status == 503
    manager.exited(manager.supervisor("Box", "object-0", None), first.id)
    await launch(manager, "object-2")
    assert manager.running_count("Box") == 2


async def test_start_rate_limit_gives_too_many_starts(tmp_path: Path) -> None:
    manager = make_manager(tmp_path, max_instances=10, starts_per_second=3)
    await manager.start()
    for i in range(3):
        await launch(manager, f"object-{i}")
    with pytest.raises(TooManyStarts, match="more than 3 starts per second") as caught:
        await launch(manager, "object-3")
    assert caught.value.status == 429


async def test_container_spec_carries_labels_env_and_limits(tmp_path: Path) -> None:
    manager = make_manager(tmp_path, max_instances=1, starts_per_second=10)
    await manager.start()
    info = await launch(
        manager, "abc123", "alice", env={"A": "1"}, entrypoint=["srv"], enable_internet=False
    )
    [spec] = manager.runtime.started  # type: ignore[attr-defined]
    assert spec.labels == {
        "dockyard.app": "limits",
        "dockyard.owner": "test-owner",
        "dockyard.class": "Box",
        "dockyard.object_id": "abc123",
        "dockyard.object_name": "alice",
        "dockyard.version": "ab12ab12ab12",
        # The instance type's provisioned size (lite): what metering bills.
        "dockyard.vcpu": "0.0625",
        "dockyard.memory_mib": "256",
        "dockyard.disk_mb": "2000",
    }
    assert spec.env == {
        "A": "1",
        "DOCKYARD_DURABLE_OBJECT_ID": "abc123",
        "DOCKYARD_APPLICATION": "limits",
        "DOCKYARD_LOCATION": "local",
        # Cloudflare's names for the same (issue 11), so images built for it run unchanged.
        "CLOUDFLARE_DURABLE_OBJECT_ID": "abc123",
        "CLOUDFLARE_APPLICATION_ID": "limits",
        "CLOUDFLARE_LOCATION": "local",
        "CLOUDFLARE_REGION": "local",
        "CLOUDFLARE_COUNTRY_A2": "XX",
    }
    assert (spec.vcpu, spec.memory_mib, spec.disk_mb) == (0.0625, 256, 2000)
    assert spec.entrypoint == ["srv"] and spec.enable_internet is False
    assert info.host_ports[8080] == 48080


async def test_a_boosted_start_runs_without_the_cpu_quota(tmp_path: Path) -> None:
    manager = make_manager(tmp_path, max_instances=1, starts_per_second=10)
    await manager.start()
    await launch(manager, "abc123", boost=True)
    [spec] = manager.runtime.started  # type: ignore[attr-defined]
    assert spec.vcpu is None and spec.memory_mib == 256


async def test_adoption_lists_only_this_owners_containers(tmp_path: Path) -> None:
    manager = make_manager(tmp_path, max_instances=1, starts_per_second=10)
    await manager.start()
    assert manager.runtime.listed == [  # type: ignore[attr-defined]
        {"dockyard.app": "limits", "dockyard.owner": "test-owner"}
    ]
