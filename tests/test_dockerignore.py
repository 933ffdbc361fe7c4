"""Dockyard's .dockerignore matcher sends what the engine itself would send."""

from __future__ import annotations

import asyncio
import io
import secrets
import tarfile
from pathlib import Path

import pytest

from dockyard.containers.images import context_files
from tests.support.engine import docker_cli

pytestmark = pytest.mark.docker

FILES = [
    "secret.txt",
    "sub/secret.txt",
    "a.log",
    "sub/b.log",
    "keep.log",
    "sub/deep/c.log",
    "build/x",
    "build.txt",
    "sub/build/y",
]
IGNORE = "secret.txt\n*.log\n!keep.log\nbuild\n**/deep\n"


async def test_the_same_files_as_the_engines_own_context_rules(tmp_path: Path) -> None:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".dockerignore").write_text(IGNORE)
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    tag = f"dockyard-test-ignore:{secrets.token_hex(4)}"
    await docker_cli("build", "-q", "-t", tag, "--label", "dockyard.app=test-ignore", str(tmp_path))
    try:
        container = (await docker_cli("create", tag, "none")).strip()
        try:
            proc = await asyncio.create_subprocess_exec(
                "docker", "export", container, stdout=asyncio.subprocess.PIPE
            )
            data, _ = await proc.communicate()
        finally:
            await docker_cli("rm", container)
    finally:
        await docker_cli("rmi", tag)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        sent = sorted(
            m.name.removeprefix("ctx/") for m in archive if m.isfile() and m.name.startswith("ctx/")
        )
    ours = sorted(n for n, path in context_files(tmp_path) if path.is_file())
    # Docker anchors patterns at the root: sub/secret.txt, sub/b.log, sub/build/y stay.
    expected = [".dockerignore", "Dockerfile", "build.txt", "keep.log"]
    assert sent == [*expected, "sub/b.log", "sub/build/y", "sub/secret.txt"]
    assert ours == sent
