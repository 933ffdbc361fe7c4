"""Pulling a container class's image from a registry: which references, credentials, progress.

Only references that name a registry host (``127.0.0.1:5000/team/api:1.2``,
``registry.example.com/api@sha256:…``) are pulled. Dockyard never reaches Docker Hub by
itself, so a bare name such as ``nginx:1.27`` must be on the engine already: a platform
that silently fetched whatever a name resolves to upstream would run unreviewed code.

Credentials are what ``docker login`` stored for the registry host: the ``auths`` entry in
``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``). Credential helpers
(``credsStore``, ``credHelpers``) are not run. Credentials go to the engine only; no line
printed or logged here carries them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dockyard.containers.runtime import ImagePuller
from dockyard.errors import ImageError

log = logging.getLogger(__name__)

# Steps of a layer whose progress comes in many messages: shown at each quarter.
_MEASURED = frozenset({"Downloading", "Extracting"})


def registry_host(ref: str) -> str | None:
    """The registry host an image reference names (``host[:port]``), or None when it names
    none (the engine would go to Docker Hub). The engine's rule: the first path component
    is a host when it has a dot or a port, or is ``localhost``."""
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def docker_config_path() -> Path:
    """Where the docker CLI keeps its config, so ``docker login`` credentials are found."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def registry_auth(host: str, config: Path | None = None) -> dict[str, str] | None:
    """The engine's credential object for `host` from the docker CLI config, or None.

    A config that cannot be read is logged and treated as having no credentials: the
    registry's refusal then says what is wrong more precisely than a parse error would.
    """
    path = config if config is not None else docker_config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring %s for registry credentials: %s", path, type(exc).__name__)
        return None
    if not isinstance(data, dict):
        return None
    auths = data.get("auths")
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        if _auth_host(str(key)) == host and isinstance(entry, dict):
            found = _credentials(entry, host)
            if found is not None:
                return found
            log.warning("The auths entry for %s in %s has no usable credentials", host, path)
    helpers = data.get("credHelpers")
    if data.get("credsStore") or (isinstance(helpers, dict) and host in helpers):
        log.info(
            "%s names a credential helper; Dockyard does not run helpers, so %s is asked "
            "without credentials",
            path,
            host,
        )
    return None


def _auth_host(key: str) -> str:
    # `docker login` has written keys as `host`, `https://host` and `https://host/v1/`.
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    return key.partition("/")[0]


def _credentials(entry: Mapping[str, Any], host: str) -> dict[str, str] | None:
    if entry.get("identitytoken"):
        return {"identitytoken": str(entry["identitytoken"]), "serveraddress": host}
    username, password = entry.get("username"), entry.get("password")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, _, password = decoded.partition(":")
    if not username:
        return None
    return {"username": str(username), "password": str(password or ""), "serveraddress": host}


class PullProgress:
    """The engine's pull messages as console lines: one per layer and step, and for
    downloads and extractions one per quarter done, instead of one per message (hundreds
    per layer). Remembers the manifest digest the engine reports."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._shown: dict[str, tuple[str, int]] = {}
        self.digest: str | None = None

    def __call__(self, message: Mapping[str, Any]) -> None:
        status = str(message.get("status") or "").strip()
        layer = str(message.get("id") or "")
        if not status:
            return
        if status.startswith("Digest: "):
            # Not shown: `pull_image` reports it with the image id once the pull is done.
            self.digest = status.removeprefix("Digest: ").strip()
            return
        if not layer or status.startswith("Pulling from "):
            self._emit(status)
            return
        detail = message.get("progressDetail") or {}
        done, total = detail.get("current"), detail.get("total")
        quarter, line = -1, f"layer {layer}: {status}"
        if status in _MEASURED and isinstance(done, int) and isinstance(total, int) and total:
            quarter = min(4, done * 4 // total)
            line = f"{line} {_size(done)} of {_size(total)}"
        if self._shown.get(layer) != (status, quarter):
            self._shown[layer] = (status, quarter)
            self._emit(line)


def _size(count: int) -> str:
    # Decimal units, as the docker CLI shows them.
    if count < 1000:
        return f"{count} B"
    if count < 1_000_000:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.1f} MB"


async def pull_image(
    puller: ImagePuller, ref: str, *, what: str, on_output: Callable[[str], None]
) -> str:
    """Pull `ref` (which must name a registry host) with the credentials ``docker login``
    stored for it, showing progress on `on_output`; the image id.

    `what` says who needs the image, for the error (``container class 'Api'``). Raises
    `ImageError` naming the registry and what to check; `EngineUnavailable` as the puller.
    """
    host = registry_host(ref)
    if host is None:
        raise ImageError(f"{ref} names no registry host to pull from")
    config = docker_config_path()
    auth = await asyncio.to_thread(registry_auth, host, config)
    login = f" with the credentials of `docker login {host}`" if auth else ""
    on_output(f"pulling {ref} from the registry at {host}{login}")
    progress = PullProgress(on_output)
    try:
        image_id = await puller.pull(ref, auth, progress)
    except ImageError as exc:
        held = f"the credentials in {config} were sent" if auth else f"{config} has none for it"
        raise ImageError(
            f"Could not pull {ref} for {what}: {_reason(exc)}. Check that the registry at "
            f"{host} is running and reachable from the container engine, that {ref} was "
            f"pushed there, and, if it wants a login, run `docker login {host}` ({held})."
        ) from exc
    # A digest reference names its manifest; for a tag, the engine reported it.
    digest = ref.partition("@")[2] or progress.digest or "not reported"
    on_output(f"pulled {ref}: digest {digest}, image {image_id}")
    log.debug("Pulled %s for %s: digest %s, image %s", ref, what, digest, image_id)
    return image_id


def _reason(exc: ImageError) -> str:
    # The runtime's message reads "Could not pull REF: WHY (engine text)"; keep WHY onward.
    prefix, sep, rest = exc.message.partition(": ")
    return rest if sep and prefix.startswith("Could not pull") else exc.message
