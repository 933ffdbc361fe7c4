"""Static assets (``assets`` in the wrangler config), served as Cloudflare serves them.

A GET or HEAD whose path names a file under ``assets.directory`` is answered from it,
before the worker runs (unless ``run_worker_first`` says otherwise); anything else goes
to the worker, which may call ``env.ASSETS.fetch(request)`` itself.

- ``html_handling`` (default ``auto-trailing-slash``): ``/about`` serves ``about.html`` or
  ``about/index.html``; ``/about.html`` and ``/about/index.html`` redirect (307) to the
  pretty URL. ``force-trailing-slash`` / ``drop-trailing-slash`` prefer one form for HTML
  pages; ``none`` serves exact file names only.
- ``not_found_handling``: ``none`` (the worker answers; ``env.ASSETS.fetch`` gives an empty
  404), ``404-page`` (the nearest ``404.html`` with status 404) or
  ``single-page-application`` (``/index.html`` with 200 for navigations).
- Headers: Cloudflare's content types (``text/html; charset=utf-8``,
  ``text/javascript; charset=utf-8``, ``image/vnd.microsoft.icon``, ...), a strong
  ``ETag`` (304 for a matching ``If-None-Match``), ``Cache-Control: public, max-age=0,
  must-revalidate``, and single byte ranges (206, 416).
- A path that leaves the directory (``..``, encoded or not, backslashes, NUL, a symlink
  pointing out) is never served: it is treated as not found.
"""

from __future__ import annotations

import fnmatch
import hashlib
import mimetypes
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from yarl import URL

from dockyard.http import Request, Response

__all__ = ["Assets", "content_type"]

CHUNK = 64 * 1024
CACHE_CONTROL = "public, max-age=0, must-revalidate"
_TYPES = {
    ".html": "text/html",
    ".htm": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".cjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".ico": "image/vnd.microsoft.icon",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".wasm": "application/wasm",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".pdf": "application/pdf",
    ".webmanifest": "application/manifest+json",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mp3": "audio/mpeg",
    ".zip": "application/zip",
}
_CHARSET = ("text/", "application/json", "application/xml", "application/manifest+json")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def content_type(path: Path) -> str:
    """Cloudflare's content type for a file name (UTF-8 charset on text types)."""
    suffix = path.suffix.lower()
    kind = _TYPES.get(suffix) or mimetypes.types_map.get(suffix) or "application/octet-stream"
    if kind.startswith(_CHARSET) or kind == "text/javascript":
        kind += "; charset=utf-8"
    return kind


class _Found:
    """What a path resolved to: a file to serve, a redirect, or nothing."""

    def __init__(
        self, file: Path | None = None, redirect: str | None = None, status: int = 200
    ) -> None:
        self.file = file
        self.redirect = redirect
        self.status = status


class Assets:
    """The assets of one project, and its ``env.ASSETS`` binding (``fetch``)."""

    def __init__(
        self,
        directory: Path,
        *,
        html_handling: str = "auto-trailing-slash",
        not_found_handling: str = "none",
        run_worker_first: bool | list[str] = False,
    ) -> None:
        self.directory = directory.resolve()
        self.html_handling = html_handling
        self.not_found_handling = not_found_handling
        self.run_worker_first = run_worker_first
        self._etags: dict[tuple[str, int, int], str] = {}

    def __repr__(self) -> str:
        return f"<Assets {self.directory}>"

    # -- routing in front of the worker ---------------------------------------------------

    def worker_first(self, path: str) -> bool:
        rule = self.run_worker_first
        if isinstance(rule, bool):
            return rule
        included = any(fnmatch.fnmatchcase(path, p) for p in rule if not p.startswith("!"))
        excluded = any(fnmatch.fnmatchcase(path, p[1:]) for p in rule if p.startswith("!"))
        return included and not excluded

    def match(self, request: Request) -> Response | None:
        """The asset answer to ``request``, or None when the worker should answer it."""
        if request.method not in ("GET", "HEAD"):
            return None
        found = self._resolve(URL(request.url).raw_path)
        if found.file is None and found.redirect is None:
            navigate = request.headers.get("sec-fetch-mode", "") == "navigate"
            if self.not_found_handling == "single-page-application" and navigate:
                found = self._not_found(URL(request.url).raw_path)
            else:
                return None
        return self._respond(request, found)

    async def fetch(self, request: Request | str, **_init: Any) -> Response:
        """``env.ASSETS.fetch(request)``: the asset, or not_found_handling's answer."""
        if isinstance(request, str):
            request = Request(request)
        if request.method not in ("GET", "HEAD"):
            return Response(None, status=405, headers={"allow": "GET, HEAD"})
        path = URL(request.url).raw_path
        found = self._resolve(path)
        if found.file is None and found.redirect is None:
            found = self._not_found(path)
        return self._respond(request, found)

    # -- resolution -----------------------------------------------------------------------

    def _file(self, relative: str) -> Path | None:
        """The regular file at ``relative`` inside the directory, never outside it."""
        if "\\" in relative or "\x00" in relative:
            return None
        parts = [p for p in relative.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        candidate = self.directory.joinpath(*parts)
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.directory) or not real.is_file():
            return None
        return real

    def _resolve(self, raw_path: str) -> _Found:
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            return _Found()
        if not path.startswith("/"):
            path = "/" + path
        mode = self.html_handling
        if mode == "none":
            return _Found(self._file(path))
        if path.endswith("/"):
            index = self._file(path + "index.html")
            if index is not None:
                if mode == "drop-trailing-slash" and path != "/":
                    return _Found(redirect=path.rstrip("/"))
                return _Found(index)
            page = self._file(path.rstrip("/") + ".html") if path != "/" else None
            if page is not None:
                if mode == "force-trailing-slash":
                    return _Found(page)
                return _Found(redirect=path.rstrip("/"))
            return _Found()
        if path.endswith("/index.html") and self._file(path) is not None:
            return _Found(redirect=path[: -len("index.html")])
        if path.endswith(".html") and self._file(path) is not None:
            pretty = path[: -len(".html")]
            if mode == "force-trailing-slash":
                pretty += "/"
            return _Found(redirect=pretty)
        exact = self._file(path)
        if exact is not None:
            return _Found(exact)
        page = self._file(path + ".html")
        if page is not None:
            if mode == "force-trailing-slash":
                return _Found(redirect=path + "/")
            return _Found(page)
        if self._file(path + "/index.html") is not None:
            if mode == "drop-trailing-slash":
                return _Found(self._file(path + "/index.html"))
            return _Found(redirect=path + "/")
        return _Found()

    def _not_found(self, raw_path: str) -> _Found:
        if self.not_found_handling == "single-page-application":
            index = self._file("/index.html")
            if index is not None:
                return _Found(index)
        elif self.not_found_handling == "404-page":
            folder = unquote(raw_path).rsplit("/", 1)[0]
            while True:
                page = self._file(f"{folder}/404.html")
                if page is not None:
                    return _Found(page, status=404)
                if not folder:
                    break
                folder = folder.rsplit("/", 1)[0]
        return _Found(status=404)

    # -- responses ------------------------------------------------------------------------

    def _etag(self, file: Path, stat: os.stat_result) -> str:
        key = (str(file), stat.st_mtime_ns, stat.st_size)
        tag = self._etags.get(key)
        if tag is None:
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(chunk)
            tag = self._etags[key] = f'"{digest.hexdigest()[:32]}"'
        return tag

    def _respond(self, request: Request, found: _Found) -> Response:
        if found.redirect is not None:
            target = quote(found.redirect, safe="/%")
            query = URL(request.url).raw_query_string
            if query:
                target += "?" + query
            return Response(None, status=307, headers={"location": target})
        if found.file is None:
            return Response(None, status=found.status)
        file = found.file
        stat = file.stat()
        etag = self._etag(file, stat)
        headers = {
            "content-type": content_type(file),
            "etag": etag,
            "cache-control": CACHE_CONTROL,
        }
        if found.status == 200:
            matches = request.headers.get("if-none-match", "")
            tags = {t.strip().removeprefix("W/") for t in matches.split(",")}
            if etag in tags or "*" in tags:
                return Response(None, status=304, headers=headers)
        size = stat.st_size
        start, end = 0, size - 1
        status = found.status
        asked = request.headers.get("range")
        if asked is not None and found.status == 200:
            byte_range = _parse_range(asked, size)
            if byte_range is None:
                headers["content-range"] = f"bytes */{size}"
                return Response(None, status=416, headers=headers)
            if byte_range != (0, size - 1) or asked.strip() != "bytes=0-":
                start, end = byte_range
                status = 206
                headers["content-range"] = f"bytes {start}-{end}/{size}"
        headers["accept-ranges"] = "bytes"
        length = max(end - start + 1, 0)
        headers["content-length"] = str(length)
        if request.method == "HEAD" or length == 0:
            return Response(
                None if request.method == "HEAD" else b"", status=status, headers=headers
            )
        if length <= CHUNK:
            with file.open("rb") as handle:
                handle.seek(start)
                return Response(handle.read(length), status=status, headers=headers)
        return Response(_read(file, start, length), status=status, headers=headers)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range of ``size`` bytes, or None if unsatisfiable. Several ranges, or a
    malformed header, mean the whole file (the header is ignored, as RFC 9110 allows)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return (0, size - 1) if size else None
    first, last = match.groups()
    if not first and not last:
        return (0, size - 1) if size else None
    if not first:  # the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            return None
        return (max(size - count, 0), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return None
    return (start, end)


async def _read(file: Path, start: int, length: int) -> AsyncIterator[bytes]:
    with file.open("rb") as handle:
        handle.seek(start)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
