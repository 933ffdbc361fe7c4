"""Cloudflare's ``Request`` and ``Response`` over Dockyard's (``dockyard.http``).

Only signatures and defaults differ: instances are ``dockyard.http`` requests and
responses, so the gateway, stubs and containers take them as they are.
"""

from __future__ import annotations

import functools
import json as _json
from collections.abc import AsyncIterable, Callable
from http import HTTPMethod, HTTPStatus
from typing import Any

from dockyard.http import HeadersInit, make_headers
from dockyard.http import Request as _Request
from dockyard.http import Response as _Response

from .forms import Blob, FormData, encode_form, parse_form

__all__ = [
    "JSON_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "Request",
    "Response",
    "as_cloudflare_request",
]

# Cloudflare's defaults, byte for byte (what `new Response("text")` sets in workerd).
TEXT_CONTENT_TYPE = "text/plain;charset=UTF-8"
JSON_CONTENT_TYPE = "application/json"


# -- Request and Response ----------------------------------------------------------------


class Request(_Request):
    """``Request(url_or_request, method=..., headers=..., body=...)`` as in Cloudflare.

    ``js_object`` is the request itself: pass it wherever Cloudflare's examples pass the
    underlying JavaScript request (``asgi.fetch``, ``env.ASSETS.fetch``, ``fetch``).
    Cloudflare-only options (``cf``, ``redirect``) are accepted and ignored.
    """

    def __init__(
        self,
        input: str | _Request,
        *,
        method: str | HTTPMethod | None = None,
        headers: HeadersInit = None,
        body: Any = None,
        **_cloudflare_only: Any,
    ) -> None:
        super().__init__(
            input,
            method=str(method.value if isinstance(method, HTTPMethod) else method)
            if method is not None
            else None,
            headers=headers,
            body=body,
        )

    @property
    def js_object(self) -> Request:
        return self

    async def buffer(self) -> bytes:
        return await self.bytes()

    async def form_data(self) -> FormData:
        """The body as a ``FormData`` (urlencoded or multipart)."""
        return parse_form(self.headers.get("content-type", ""), await self.bytes())

    formData = form_data

    async def blob(self) -> Blob:
        return Blob([await self.bytes()], self.headers.get("content-type"))


def as_cloudflare_request(request: _Request) -> Request:
    """Give an incoming request Cloudflare's extras without copying it.

    The gateway builds plain ``dockyard.http.Request`` objects; ``Request`` adds only
    methods and no state, so switching the class is safe and costs nothing per request.
    """
    if type(request) is _Request:
        request.__class__ = Request
    return request  # type: ignore[return-value]


class _ClassOrInstance:
    """``Response.json(data)`` builds a response; ``await response.json()`` reads one."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self._build = build

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return functools.partial(self._build, owner)
        return _Response.json.__get__(instance, owner)


def _status(status: HTTPStatus | int | None) -> int:
    if status is None:
        return 200
    return int(status.value if isinstance(status, HTTPStatus) else status)


class Response(_Response):
    """``Response(body, status=, status_text=, headers=, web_socket=)`` as in Cloudflare.

    A ``str`` body gets ``content-type: text/plain;charset=UTF-8`` unless one is given;
    ``bytes`` and streams get none. ``status_text`` is kept on the response; the gateway
    sends the standard reason phrase (HTTP/1.1 clients ignore it, HTTP/2 has none).
    """

    def __init__(
        self,
        body: Any = None,
        status: HTTPStatus | int | None = None,
        status_text: str = "",
        headers: HeadersInit = None,
        web_socket: Any = None,
    ) -> None:
        header_map = make_headers(headers)
        if isinstance(body, FormData):
            body, kind = encode_form(body)
            header_map.setdefault("content-type", kind)
        elif isinstance(body, Blob):
            if body.content_type:
                header_map.setdefault("content-type", body.content_type)
            body = body._data
        elif body is not None and not isinstance(
            body, str | bytes | bytearray | memoryview | AsyncIterable
        ):
            raise TypeError(f"Unsupported type in Response: {type(body).__name__}")
        if isinstance(body, str):
            header_map.setdefault("content-type", TEXT_CONTENT_TYPE)
        super().__init__(body, status=_status(status), headers=header_map, web_socket=web_socket)
        self.status_text = status_text or _reason(self.status)

    def __repr__(self) -> str:
        kind = self.headers.get("content-type")
        shown = f", content_type={kind!r}" if kind else ""
        return f"Response(status={self.status}{shown})"

    @classmethod
    def from_json(
        cls,
        data: Any,
        status: HTTPStatus | int = HTTPStatus.OK,
        status_text: str = "",
        headers: HeadersInit = None,
    ) -> Response:
        header_map = make_headers(headers)
        header_map.setdefault("content-type", JSON_CONTENT_TYPE)
        return cls(_json.dumps(data), status, status_text, header_map)

    json = _ClassOrInstance(from_json.__func__)  # type: ignore[attr-defined]

    @classmethod
    def redirect(cls, url: str, status: HTTPStatus | int = HTTPStatus.FOUND) -> Response:
        code = _status(status)
        if code not in (301, 302, 303, 307, 308):
            raise ValueError(f"Invalid status code {code} for a redirect")
        return cls(None, code, headers={"location": url})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


FetchResponse = Response
