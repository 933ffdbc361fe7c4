"""The Python interpreter app processes run on, when they run as their own uids.

An app's uid must be able to execute the interpreter and read Dockyard's packages. The
node's own interpreter often qualifies (a system Python, a venv under /opt), but not when
it lives in a private home (pyenv under /root is mode 0700). Then the node makes a small
venv under its data folder from a world-readable Python of the same version (Debian's
``/usr/bin/python3.X``), with one ``.pth`` line that adds the node's own site-packages:
the app process imports exactly the Dockyard and dependencies the node runs, while
everything it reads stays readable by app uids.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

from ..errors import DockyardError

__all__ = ["app_interpreter"]


def app_interpreter(runtime_dir: Path) -> str:
    """An interpreter other uids can run with Dockyard importable (see the module doc)."""
    if _others_can_use(Path(sys.executable)) and _others_can_use(Path(sys.base_prefix)):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = _world_python(version)
    if base is None:
        raise DockyardError(
            f"app processes run as their own users, who cannot run {sys.executable} (a "
            f"private folder); install a system Python {version} (Debian: python{version}) "
            "or install Dockyard where every user can read it, e.g. under /opt"
        )
    venv = runtime_dir / f"python{version}"
    python = venv / "bin" / "python3"
    site = venv / "lib" / f"python{version}" / "site-packages"
    pth = site / "dockyard-node.pth"
    node_site = sysconfig.get_paths()["purelib"]
    line = f"import site; site.addsitedir({node_site!r})\n"
    if not python.exists() or not pth.exists() or pth.read_text() != line:
        shutil.rmtree(venv, ignore_errors=True)
        runtime_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        made = subprocess.run(
            [base, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise DockyardError(
                f"could not make the app processes' Python from {base}: {made.stderr.strip()}"
            )
        pth.write_text(line)
    for folder in (runtime_dir, *_parents(venv)):
        folder.chmod(folder.stat().st_mode | 0o055)
    if not _others_can_use(Path(node_site)):
        raise DockyardError(
            f"app processes cannot read Dockyard's packages in {node_site} (a private "
            "folder); install Dockyard where every user can read it, e.g. under /opt"
        )
    return str(python)


def _parents(venv: Path) -> list[Path]:
    return [venv, *(p for p in venv.rglob("*") if p.is_dir())]


def _world_python(version: str) -> str | None:
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if os.access(candidate, os.X_OK) and _others_can_use(Path(candidate)):
            return candidate
    return None


def _others_can_use(path: Path) -> bool:
    """Whether a uid with no special rights can reach ``path`` (every folder on the way
    searchable, the file itself readable)."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    for folder in real.parents:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(real.stat().st_mode & stat.S_IROTH)
