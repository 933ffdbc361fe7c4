"""Pyodide's ``pyodide.ffi`` as Dockyard stand-ins (see dockyard.compat.ffi)."""

from dockyard.compat.ffi import *  # noqa: F403
from dockyard.compat.ffi import __all__  # noqa: F401
