"""Projects written the way Cloudflare's Python Workers are, served by a real ``dockyard dev``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict


def cf_project(
    root: Path,
    entry: str,
    config: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """A project laid out as `pywrangler init` makes one: wrangler.jsonc and src/entry.py."""
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "entry.py").write_text(textwrap.dedent(entry))
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    wrangler = {
        "name": "cf-probe",
        "main": "src/entry.py",
        "compatibility_date": "2026-11-01",
        "compatibility_flags": ["python_workers"],
        **(config or {}),
    }
    (root / "wrangler.jsonc").write_text(json.dumps(wrangler, indent=2))
    return root


async def request(
    url: str, method: str = "GET", **kwargs: Any
) -> tuple[int, str | None, bytes, CIMultiDict[str]]:
    """(status, content-type or None, body, headers) of one request, redirects not followed."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, allow_redirects=False, **kwargs) as response,
    ):
        body = await response.read()
        return (
            response.status,
            response.headers.get("Content-Type"),
            body,
            CIMultiDict(response.headers),
        )
