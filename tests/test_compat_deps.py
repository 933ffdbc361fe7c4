"""A project's `[project] dependencies`, installed with uv into `.dockyard/python/`.

The packages come from wheels this test writes into a local folder; uv runs offline.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

WORKER = """
import greeting
from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(greeting.hello("dockyard") + " from " + greeting.__version__)
"""


def write_wheel(folder: Path, name: str, version: str, source: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no build backend, no network)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def offline_uv(tmp_path: Path, wheels: Path) -> dict[str, str]:
    return {
        "UV_OFFLINE": "1",
        "UV_FIND_LINKS": str(wheels),
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_NO_CONFIG": "1",
    }


def with_dependencies(root: Path, deps: list[str]) -> Path:
    project = cf_project(root, WORKER)
    listed = ", ".join(f'"{d}"' for d in deps)
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "probe"\nversion = "0.1.0"\ndependencies = [{listed}]\n'
    )
    return project


@pytest.mark.slow
async def test_dependencies_install_once_and_are_importable(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    write_wheel(
        wheels,
        "greeting",
        "1.0",
        "__version__ = '1.0'\ndef hello(name):\n    return 'hello ' + name\n",
    )
    project = with_dependencies(tmp_path / "project", ["greeting==1.0"])
    env = offline_uv(tmp_path, wheels)
    with DevServer(project, env=env) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            "text/plain;charset=UTF-8",
            b"hello dockyard from 1.0",
        )
        assert "Installing the worker's dependencies with uv: greeting==1.0" in server.output
    # The second start finds the same list: nothing is installed.
    with DevServer(project, env=env) as server:
        assert (await request(server.url + "/"))[2] == b"hello dockyard from 1.0"
        assert "Installing" not in server.output and "uv:" not in server.output
    # A changed list is installed again.
    write_wheel(
        wheels,
        "greeting",
        "2.0",
        "__version__ = '2.0'\ndef hello(name):\n    return 'hi ' + name\n",
    )
    with_dependencies(tmp_path / "project", ["greeting==2.0"])
    with DevServer(project, env=env) as server:
        assert (await request(server.url + "/"))[2] == b"hi dockyard from 2.0"
        assert "Installing the worker's dependencies with uv: greeting==2.0" in server.output


async def test_a_failed_install_names_the_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    project = with_dependencies(tmp_path / "project", ["no-such-package-xyz>=1"])
    server = DevServer(project, env=offline_uv(tmp_path, wheels))
    with pytest.raises(AssertionError):
        server.start(timeout=60)
    assert server.stop() == 1
    output = server.output
    assert "installing the worker's dependencies failed" in output
    assert "no-such-package-xyz" in output
    assert "Traceback" not in output


async def test_dependencies_dockyard_already_has_are_not_installed(tmp_path: Path) -> None:
    project = cf_project(
        tmp_path,
        "from workers import Response\n\n"
        'async def fetch(request, env, ctx):\n    return Response("ok")\n',
    )
    (project / "pyproject.toml").write_text(
        '[project]\nname = "probe"\nversion = "0.1.0"\n'
        'dependencies = ["aiohttp>=3", "packaging", "pywin32; sys_platform == \'win32\'"]\n'
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with DevServer(project, env=offline_uv(tmp_path, wheels)) as server:
        assert (await request(server.url + "/"))[:3] == (200, "text/plain;charset=UTF-8", b"ok")
        assert "Installing" not in server.output
    assert not (project / ".dockyard" / "python").exists()
