"""The node's image registry: Debian's ``docker-registry`` (distribution 2.8), supervised.

The registry listens on 127.0.0.1 only, without auth: the node's engine pulls from it by
`Registry.address`, and everyone else reaches it through `registry_proxy`, which the admin
listener mounts on ``/v2/`` and which checks the node's tokens. Its directory holds
``config.yml`` (rewritten at each start), ``port`` (kept across restarts, so the run refs
``127.0.0.1:PORT/repo@sha256:...`` the engine knows stay valid), ``http-secret``,
``storage/`` and ``registry.log``.

Garbage collection needs a registry that does not write meanwhile (distribution's own rule:
a push racing the mark phase can lose blobs it references). `garbage_collect` therefore
restarts the registry read-only for the sweep, so pulls keep working and pushes get
``UNSUPPORTED`` for its duration, and restarts it writable afterwards, which also drops
anything the old process had cached about deleted blobs.

Over 400 lines: one supervised process (start, health, restart, garbage collection, the
proxy in front of it) with its helpers; the helpers are only used here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ..errors import DockyardError, InvalidArgument
from ..http import HOP_BY_HOP

log = logging.getLogger(__name__)

# Until NodeSettings carries them (the lead wires these).
START_TIMEOUT = 30.0  # seconds for GET /v2/ to answer 200 after a launch
STOP_GRACE = 10.0  # SIGTERM, then SIGKILL after this
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # restart delay, doubling
STABLE_AFTER = 60.0  # a run this long resets the back-off
PORT_WAIT = 5.0  # how long the remembered port may stay taken before the registry moves
LOG_MAX_BYTES = 8 * 1024 * 1024  # registry.log rotates to registry.log.1 past this

# What a client accepts when it asks for a manifest: single images and indexes, both formats.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ImageEntry:
    """One manifest in the registry and the tags that name it."""

    repo: str
    tags: tuple[str, ...]
    digest: str
    size: int  # manifest + config + layers, compressed bytes as stored


class Registry:
    """A ``docker-registry serve`` child: started, watched, restarted, stopped."""

    def __init__(self, directory: Path, *, binary: str = "docker-registry") -> None:
        self.directory = directory
        self._binary = binary
        self._port: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lifecycle = asyncio.Lock()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: where the node's engine pulls from."""
        if self._port is None:
            raise DockyardError("the registry was not started")
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """The running registry process, or None between runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # Lifecycle

    async def start(self) -> None:
        """Launch the registry and return once it answers; raises DockyardError if it cannot."""
        async with self._lifecycle:
            if self._session is not None:
                return
            if shutil.which(self._binary) is None:
                raise DockyardError(
                    f"the registry binary {self._binary!r} is not installed: run scripts/setup "
                    "(it installs Debian's docker-registry)"
                )
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._port = await self._choose_port()
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            )
            try:
                await self._launch(readonly=False)
            except BaseException:
                await self._halt()
                await self._session.close()
                self._session = None
                raise
            self._supervisor = asyncio.create_task(self._supervise(), name="registry-supervisor")

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after `STOP_GRACE`; a no-op when not running."""
        async with self._lifecycle:
            await self._halt()
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _choose_port(self) -> int:
        remembered = self.directory / "port"
        with contextlib.suppress(OSError, ValueError):
            port = int(remembered.read_text())
            # The last registry may still be exiting (its node was SIGKILLed a moment ago).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + PORT_WAIT
            while not _port_is_free(port):
                if loop.time() > deadline:
                    log.warning("registry port %d is taken; the registry moves", port)
                    break
                await asyncio.sleep(0.05)  # polls the condition: the port comes free
            else:
                return port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        remembered.write_text(f"{port}\n")
        return port

    def _write_config(self, *, readonly: bool) -> Path:
        secret_file = self.directory / "http-secret"
        if not secret_file.exists():
            # Signs upload state: a fixed one lets an upload outlive a registry restart.
            _write_private(secret_file, secrets.token_urlsafe(32))
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.directory / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"readonly": {"enabled": readonly}},
            },
            "http": {
                "addr": self.address,
                "relativeurls": True,
                "secret": secret_file.read_text().strip(),
            },
        }
        path = self.directory / "config.yml"
        # JSON is YAML: no quoting rules of our own to get wrong.
        _write_private(path, json.dumps(config, indent=2) + "\n")
        return path

    async def _launch(self, *, readonly: bool) -> None:
        config = self._write_config(readonly=readonly)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        proc = await asyncio.create_subprocess_exec(
            self._binary,
            "serve",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
            limit=1024 * 1024,
        )
        self._proc = proc
        assert proc.stdout is not None
        self._pump = asyncio.create_task(self._pump_log(proc.stdout), name="registry-log")
        try:
            await self._wait_ready(proc)
        except BaseException:
            await self._terminate()
            raise

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        url = f"http://{self.address}/v2/"
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            # Waits on the other way out, the process ending, while it polls.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
            if proc.returncode is not None:
                if self._pump is not None:
                    await self._pump  # its last words, for the message
                raise DockyardError(
                    f"the registry exited with {proc.returncode} on start; "
                    f"see {self.directory / 'registry.log'}: {self._log_tail()}"
                )
            if loop.time() > deadline:
                raise DockyardError(
                    f"the registry did not answer on {self.address} within {START_TIMEOUT:g} s; "
                    f"see {self.directory / 'registry.log'}"
                )

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            proc = self._proc
            assert proc is not None
            started = loop.time()
            code = await proc.wait()
            if loop.time() - started > STABLE_AFTER:
                delay = BACKOFF_FIRST
            log.error("the registry exited with %s; restarting it in %.1f s", code, delay)
            await asyncio.sleep(delay)  # back-off, not a wait for a condition
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                await self._launch(readonly=False)
            except (DockyardError, OSError) as exc:
                log.error("%s", exc)  # self._proc has ended: the loop backs off and retries

    async def _halt(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._pump is not None:
            await self._pump
            self._pump = None

    async def _pump_log(self, stream: asyncio.StreamReader) -> None:
        """Copy the registry's output to registry.log; its errors go to the node's log too."""
        path = self.directory / "registry.log"
        out = path.open("ab")
        try:
            while line := await _readline(stream):
                if out.tell() > LOG_MAX_BYTES:
                    out.close()
                    path.replace(path.with_name("registry.log.1"))
                    out = path.open("ab")
                out.write(line)
                out.flush()
                text = line.decode(errors="replace").rstrip()
                # A 4xx answer is logged at error level too ("manifest unknown" on every
                # HEAD for a missing image): those are the client's business, not ours.
                if _ERROR_LINE.search(text) and not _CLIENT_ERROR.search(text):
                    log.error("registry: %s", text)
        finally:
            out.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.directory / "registry.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-3:])
        return ""

    # Registry API

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        """The digest of ``repo:reference`` (a tag or a digest); None when it has none."""
        url = self._url(repo, "manifests", _reference(reference))
        async with self._request("HEAD", url, headers={"Accept": MANIFEST_TYPES}) as resp:
            if resp.status == 404:
                return None
            await _expect(resp, 200, f"HEAD {repo}:{reference}")
            return resp.headers.get("Docker-Content-Digest")

    async def catalog(self, *, page_size: int = 1000) -> list[ImageEntry]:
        """Every tagged manifest, one entry per (repo, digest), sorted."""
        entries: list[ImageEntry] = []
        first = f"http://{self.address}/v2/_catalog?n={page_size}"
        for repo in await self._paged(first, "repositories"):
            by_digest: dict[str, tuple[list[str], int]] = {}
            for tag in await self._paged(self._url(repo, "tags", "list"), "tags"):
                found = await self._manifest(repo, tag)
                if found is None:
                    continue  # untagged meanwhile
                tags, _ = by_digest.setdefault(found[0], ([], found[1]))
                tags.append(tag)
            for digest, (tags, size) in by_digest.items():
                entries.append(ImageEntry(repo, tuple(sorted(tags)), digest, size))
        return sorted(entries, key=lambda e: (e.repo, e.digest))

    async def delete(self, repo: str, digest: str) -> None:
        """Delete a manifest and the tags naming it; a no-op when it is already gone.
        Its blobs stay until `garbage_collect`."""
        if _DIGEST.fullmatch(digest) is None:
            raise InvalidArgument(f"not a digest: {digest!r}")
        async with self._request("DELETE", self._url(repo, "manifests", digest)) as resp:
            if resp.status != 404:
                await _expect(resp, 202, f"DELETE {repo}@{digest}")

    async def garbage_collect(self) -> str:
        """Remove blobs and untagged manifests nothing references; returns the tool's output.

        The registry runs read-only meanwhile (see the module docstring). Untagged means
        gone: a manifest kept only by digest must keep a tag (deploys push by a deploy-id
        tag, which never moves). distribution 2.8 also sweeps the untagged platform
        manifests of a multi-platform index (distribution#3004/#3178); the node's images
        are single-platform, as ``docker build`` makes them."""
        async with self._lifecycle:
            if self._session is None:
                raise DockyardError("the registry was not started")
            if not (self.directory / "storage/docker/registry/v2/repositories").is_dir():
                return ""  # nothing was ever pushed (and the tool fails on an empty store)
            await self._halt()
            try:
                await self._launch(readonly=True)
                proc = await asyncio.create_subprocess_exec(
                    self._binary,
                    "garbage-collect",
                    "--delete-untagged",
                    str(self.directory / "config.yml"),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                try:
                    output, _ = await proc.communicate()
                except BaseException:
                    # Cancelled (the node stops): no sweep may outlive the read-only run.
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                    raise
                text = output.decode(errors="replace")
                if proc.returncode != 0:
                    raise DockyardError(
                        f"docker-registry garbage-collect exited with {proc.returncode}: "
                        f"{text[-2000:]}"
                    )
                return text
            finally:
                await self._terminate()
                try:
                    await self._launch(readonly=False)
                except DockyardError as exc:
                    log.error("%s", exc)  # the supervisor retries with back-off
                self._supervisor = asyncio.create_task(
                    self._supervise(), name="registry-supervisor"
                )

    def _url(self, repo: str, kind: str, rest: str) -> str:
        if _REPO.fullmatch(repo) is None or len(repo) > 255:
            raise InvalidArgument(f"not a repository name: {repo!r}")
        return f"http://{self.address}/v2/{repo}/{kind}/{rest}"

    @contextlib.asynccontextmanager
    async def _request(
        self, method: str, url: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request to the registry itself (URL already encoded); a registry that does not
        answer (restarting, say) is a DockyardError, not aiohttp's."""
        if self._session is None:
            raise DockyardError("the registry was not started")
        try:
            async with self._session.request(method, URL(url, encoded=True), **kwargs) as resp:
                yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DockyardError(
                f"the registry at {self.address} did not answer {method} {URL(url).path}: {exc}"
            ) from exc

    async def _manifest(self, repo: str, reference: str) -> tuple[str, int] | None:
        url = self._url(repo, "manifests", reference)
        async with self._request("GET", url, headers={"Accept": MANIFEST_TYPES}) as resp:
            if resp.status == 404:
                return None
            await _expect(resp, 200, f"GET {repo}:{reference}")
            body = await resp.read()
            digest = resp.headers.get("Docker-Content-Digest", "")
        manifest = json.loads(body)
        parts = [manifest.get("config") or {}, *manifest.get("layers", ())]
        parts += manifest.get("manifests", ())
        return digest, len(body) + sum(int(part.get("size", 0)) for part in parts)

    async def _paged(self, url: str, key: str) -> list[str]:
        items: list[str] = []
        next_url: str | None = url
        while next_url is not None:
            async with self._request("GET", next_url) as resp:
                if resp.status == 404:
                    return items  # a repository deleted meanwhile
                await _expect(resp, 200, f"GET {next_url}")
                items += (await resp.json()).get(key) or []
                link = resp.links.get("next")
                following = link.get("url") if link is not None else None
            # aiohttp resolves the registry's relative link against the request's URL.
            next_url = str(resp.url.join(URL(str(following)))) if following else None
        return items

    # The proxy's upstream half

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            return _error(503, "UNAVAILABLE", "the registry is not running")
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _NOT_FORWARDED
        ]
        body = request.content if request.body_exists else None
        url = URL(f"http://{self.address}{request.raw_path}", encoded=True)
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientConnectionError, TimeoutError):
            return _error(503, "UNAVAILABLE", "the registry is not answering; try again")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response


# Request headers the proxy keeps to itself: its own connection's, the client's
# credentials for the node, and Expect (aiohttp has already answered 100-continue).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "expect"}
_ERROR_LINE = re.compile(r"\blevel=(?:error|fatal|panic)\b")
_CLIENT_ERROR = re.compile(r"\bhttp\.response\.status=4\d\d\b")


def registry_proxy(
    registry: Registry, check: Callable[[str], str | None]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler for ``/v2/{tail:.*}`` that lets token holders at the registry.

    ``check(token)`` gives the token's scope ("admin", "read") or None. The token comes as
    the password of Basic auth (any user name: what ``docker login`` sends) or as a Bearer
    token. Without one: 401 with a Basic challenge, so ``docker login`` asks for it. A
    "read" token may GET and HEAD only (403 otherwise). Bodies stream both ways.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        token = _token(request.headers.get("Authorization", ""))
        scope = check(token) if token else None
        if scope is None:
            return _error(401, "UNAUTHORIZED", "log in with a dockyard token")
        if scope != "admin" and request.method not in ("GET", "HEAD"):
            return _error(403, "DENIED", "a read token may only pull")
        return await registry._forward(request)

    return handle


def _token(header: str) -> str | None:
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def _error(status: int, code: str, message: str) -> web.Response:
    """An answer in the registry's own error shape, which docker prints.

    The message must differ from the code's stock text: docker (20.10) turns an error
    with the stock text and no detail into a bare code, which its push does not
    recognise as final, so a denied push retried every layer five times (~50 s)."""
    headers = {"Docker-Distribution-API-Version": "registry/2.0"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="dockyard"'
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


async def _expect(resp: aiohttp.ClientResponse, status: int, what: str) -> None:
    if resp.status != status:
        text = (await resp.text(errors="replace"))[:500]
        raise DockyardError(f"the registry answered {resp.status} to {what}: {text}")


def _reference(reference: str) -> str:
    if _TAG.fullmatch(reference) is None and _DIGEST.fullmatch(reference) is None:
        raise InvalidArgument(f"not a tag or digest: {reference!r}")
    return reference


async def _readline(stream: asyncio.StreamReader) -> bytes:
    try:
        return await stream.readline()
    except ValueError:  # a line over the limit: take what is buffered
        return await stream.read(1024 * 1024) + b"\n"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As Go's listeners do: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _die_with_parent() -> None:
    """In the child before exec: a SIGKILLed node takes its registry along, so the port
    is free for the next start."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
