"""A small stand-in for Pyodide's ``js`` module: the globals Cloudflare's examples use.

Provided: ``console`` (to Dockyard's log), ``Response`` / ``Request`` / ``Headers`` with
``.new(...)``, ``Response.json``, ``WebSocketPair.new()`` (``.object_values()`` gives
``client, server``, whose ``send``/``close`` need no ``await``),
``WebSocketRequestResponsePair.new(request, response)``, ``Object.fromEntries``,
``JSON.stringify`` / ``JSON.parse``, ``Date.now()``, ``URL.new(url)`` and ``fetch``. Any
other JavaScript global is an ``AttributeError`` naming this list: there is no JavaScript
runtime behind it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from yarl import URL as _URL

from dockyard.http import make_headers

from .api import fetch
from .hibernation import CloudflareWebSocket, WebSocketRequestResponsePair, websocket_pair
from .types import Request as _Request
from .types import Response as _Response

__all__ = [
    "JSON",
    "URL",
    "Date",
    "Headers",
    "Object",
    "Request",
    "Response",
    "WebSocketPair",
    "WebSocketRequestResponsePair",
    "console",
    "fetch",
]

_log = logging.getLogger("dockyard.console")


def _text(args: tuple[Any, ...]) -> str:
    return " ".join(a if isinstance(a, str) else repr(a) for a in args)


class _Console:
    def log(self, *args: Any) -> None:
        _log.info("%s", _text(args))

    info = log

    def debug(self, *args: Any) -> None:
        _log.debug("%s", _text(args))

    def warn(self, *args: Any) -> None:
        _log.warning("%s", _text(args))

    def error(self, *args: Any) -> None:
        _log.error("%s", _text(args))


console = _Console()


def _options(init: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = dict(init) if init else {}
    merged.update(kwargs)
    return merged


class Response:
    @staticmethod
    def new(body: Any = None, init: Any = None, **kwargs: Any) -> _Response:
        options = _options(init, kwargs)
        return _Response(
            body,
            options.get("status"),
            options.get("statusText", ""),
            options.get("headers"),
            options.get("webSocket"),
        )

    @staticmethod
    def json(data: Any, init: Any = None, **kwargs: Any) -> _Response:
        options = _options(init, kwargs)
        return _Response.from_json(data, options.get("status", 200), "", options.get("headers"))

    @staticmethod
    def redirect(url: str, status: int = 302) -> _Response:
        return _Response.redirect(url, status)


class Request:
    @staticmethod
    def new(input: Any, init: Any = None, **kwargs: Any) -> _Request:
        options = _options(init, kwargs)
        return _Request(
            input,
            method=options.get("method"),
            headers=options.get("headers"),
            body=options.get("body"),
        )


class Headers:
    @staticmethod
    def new(init: Any = None) -> Any:
        return make_headers(init)


class _Pair:
    def __init__(self) -> None:
        self.client, self.server = websocket_pair()

    def object_values(self) -> tuple[CloudflareWebSocket, CloudflareWebSocket]:
        return self.client, self.server

    def __getitem__(self, index: int) -> CloudflareWebSocket:
        return (self.client, self.server)[index]

    def __iter__(self) -> Iterator[CloudflareWebSocket]:
        return iter((self.client, self.server))


class WebSocketPair:
    @staticmethod
    def new() -> _Pair:
        return _Pair()


class Object:
    @staticmethod
    def fromEntries(entries: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
        return dict(entries)

    @staticmethod
    def values(value: Any) -> list[Any]:
        """``Object.values(WebSocketPair.new())`` gives ``[client, server]``."""
        if isinstance(value, dict):
            return list(value.values())
        return list(value)

    @staticmethod
    def keys(value: Any) -> list[Any]:
        if isinstance(value, dict):
            return list(value)
        return [str(i) for i, _ in enumerate(value)]

    @staticmethod
    def entries(value: Any) -> list[tuple[Any, Any]]:
        if isinstance(value, dict):
            return list(value.items())
        return [(str(i), v) for i, v in enumerate(value)]

    @staticmethod
    def new() -> dict[Any, Any]:
        return {}


class JSON:
    @staticmethod
    def stringify(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    @staticmethod
    def parse(text: str) -> Any:
        return json.loads(text)


class Date:
    @staticmethod
    def now() -> float:
        return float(int(time.time() * 1000))


class URL:
    @staticmethod
    def new(url: str, base: str | None = None) -> _URL:
        return _URL(base).join(_URL(url)) if base is not None else _URL(url)


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"js.{name} is not available: Dockyard runs Python without a JavaScript runtime "
        f"(js provides {', '.join(__all__)})"
    )
