"""Pyodide's ``js`` module as far as Dockyard can honour it (see dockyard.compat.js)."""

from dockyard.compat.js import *  # noqa: F403
from dockyard.compat.js import __all__, __getattr__  # noqa: F401
