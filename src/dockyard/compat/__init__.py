"""What code written for Cloudflare's Python Workers imports, provided by Dockyard.

Cloudflare's runtime gives worker code a handful of modules that exist nowhere on PyPI:
``workers`` (``WorkerEntrypoint``, ``DurableObject``, ``Request``, ``Response``, ``fetch``,
``handler``, ``wsgi``, ...), ``asgi``, ``js`` and ``pyodide.ffi``. Dockyard keeps thin
versions of them in ``MODULES_DIR`` and the worker loader puts that folder on
``sys.path`` right after the worker's own folder: a module of the user's project with one
of these names still wins, and nothing is installed into site-packages where it would
shadow another project's packages.

The implementations live in this package (``dockyard.compat.api``, ``asgi``, ``wsgi``,
``js``, ``ffi``); the files under ``modules/`` only re-export them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MODULES_DIR", "current_env", "set_current_env"]

MODULES_DIR = Path(__file__).parent / "modules"

_env: Any = None


def current_env() -> Any:
    """The ``env`` of the running worker (``from workers import env``), or None before it runs."""
    return _env


def set_current_env(env: Any) -> None:
    global _env
    _env = env
