"""The worker's own Python packages: ``[project] dependencies`` of its ``pyproject.toml``.

As ``pywrangler`` does for Cloudflare, ``dockyard dev`` installs them with ``uv`` into a
per-project environment (``.dockyard/python/``) and the worker imports from it. The list
is fingerprinted: the environment is rebuilt only when the list (or the Python version)
changes, so a second start installs nothing. uv's progress goes to the console; a failed
install is a ``WorkerError`` carrying uv's own words, which name the package.

The worker runs in Dockyard's process, so a package Dockyard itself already imported
(``aiohttp``, ``pydantic``, ...) is used in Dockyard's version whatever the project pins;
a dependency that Dockyard's environment already satisfies is not installed again (and
when all are, no environment is made at all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from dockyard.errors import WorkerError

__all__ = ["WorkerEnvironment", "project_dependencies"]

log = logging.getLogger("dockyard.deps")
STAMP = "dockyard-deps.json"


def project_dependencies(project_dir: Path) -> list[str]:
    """``[project] dependencies`` from ``project_dir/pyproject.toml`` (empty if none)."""
    path = project_dir / "pyproject.toml"
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise WorkerError(f"{path.name}: cannot be read: {error}") from None
    deps = data.get("project", {}).get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise WorkerError(f"{path.name}: [project] dependencies must be a list of strings")
    return deps


def _satisfied(requirement: str) -> bool:
    """Whether Dockyard's own environment already has it (then the worker imports that one:
    in one process there can be only one, and nothing needs installing)."""
    try:
        parsed = Requirement(requirement)
    except InvalidRequirement:
        raise WorkerError(
            f"pyproject.toml: {requirement!r} is not a valid dependency specification"
        ) from None
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True  # not for this platform: nothing to install
    if parsed.url is not None:
        return False
    try:
        installed = metadata.version(parsed.name)
    except metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(installed, prereleases=True)


def _uv() -> str:
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise WorkerError(
                "the project lists dependencies but uv is not installed "
                "(pip install uv, or see https://docs.astral.sh/uv/)"
            ) from None
        return found


class WorkerEnvironment:
    """``.dockyard/python``: a virtual environment holding the project's dependencies."""

    def __init__(self, project_dir: Path, state_dir: Path) -> None:
        self.project_dir = project_dir
        self.root = state_dir / "python"

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "lib" / version / "site-packages"

    def ensure(self) -> Path | None:
        """Install what changed; the site-packages folder to import from, or None."""
        deps = [d for d in project_dependencies(self.project_dir) if not _satisfied(d)]
        if not deps:
            return None
        fingerprint = hashlib.sha256(
            json.dumps([sorted(deps), sys.version], separators=(",", ":")).encode()
        ).hexdigest()
        stamp = self.root / STAMP
        if stamp.is_file() and stamp.read_text().strip() == fingerprint:
            return self.site_packages
        log.info("Installing the worker's dependencies with uv: %s", ", ".join(deps))
        uv = _uv()
        if stamp.exists():
            stamp.unlink()
        self._run(
            [uv, "venv", "--quiet", "--allow-existing", "--python", sys.executable, str(self.root)]
        )
        self._run(
            [uv, "pip", "install", "--python", str(self.root / "bin" / "python"), *deps],
            show=True,
        )
        stamp.write_text(fingerprint + "\n")
        return self.site_packages

    def _run(self, command: list[str], show: bool = False) -> None:
        """Run uv; with ``show``, each line it prints is logged as it comes (progress)."""
        env = {**os.environ, "VIRTUAL_ENV": str(self.root)}
        lines: list[str] = []
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ) as process:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip()
                if line:
                    lines.append(line)
                    if show:
                        log.info("uv: %s", line)
        if process.returncode != 0:
            detail = "\n".join(lines)
            raise WorkerError(f"installing the worker's dependencies failed:\n{detail}")
