"""Cloudflare's ``workers`` module, provided by Dockyard (see dockyard.compat.api)."""

from typing import Any

from dockyard.compat import current_env
from dockyard.compat.api import (
    Blob,
    Context,
    DurableObject,
    FetchResponse,
    File,
    FormData,
    Headers,
    Request,
    Response,
    WorkerEntrypoint,
    WorkflowEntrypoint,
    asgi,
    fetch,
    handler,
    import_from_javascript,
    patch_env,
    python_from_rpc,
    python_to_rpc,
    wsgi,
)

__all__ = [
    "Blob",
    "Context",
    "DurableObject",
    "FetchResponse",
    "File",
    "FormData",
    "Headers",
    "Request",
    "Response",
    "WorkerEntrypoint",
    "WorkflowEntrypoint",
    "asgi",
    "env",
    "fetch",
    "handler",
    "import_from_javascript",
    "patch_env",
    "python_from_rpc",
    "python_to_rpc",
    "wsgi",
]


def __getattr__(name: str) -> Any:
    # `from workers import env`: the running worker's env, looked up when imported.
    if name == "env":
        return current_env()
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
