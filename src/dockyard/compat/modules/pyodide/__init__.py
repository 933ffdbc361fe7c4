"""A stand-in for the ``pyodide`` package: only ``pyodide.ffi`` (see dockyard.compat.ffi)."""

__version__ = "0.0.0+dockyard"
