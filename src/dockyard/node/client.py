"""The deployer's side of a node's control-plane API, and where its token is kept.

`NodeClient` has one method per route of `/api/v1` (see docs/api.md). Every failure
becomes a `NodeError` (a DockyardError) whose message is the node's own `error` text and
its error id, so what the user reads matches the node's log line; a node that does not
answer is "cannot reach the Dockyard node at URL".

Credentials: `dockyard login URL` stores `{server, token}` in
`$XDG_CONFIG_HOME/dockyard/credentials.json` (else `~/.config/dockyard/`), mode 0600.
`resolve_credentials` picks the server from `--server`, then `DOCKYARD_SERVER`, then
the file, and the token from `DOCKYARD_TOKEN`, then the file, and only when the file's
server is the one in use: a token is never sent to a server it was not issued for.

Over 400 lines: the credentials file and the client share the server URL's normal form
and NodeError, and each of the client's methods is a few lines over one request helper;
splitting would put the error decoding in one place and its only callers in another.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from dockyard.errors import DockyardError

from .._closing import AsyncClosing

__all__ = [
    "Credentials",
    "NodeClient",
    "NodeError",
    "credentials_path",
    "load_credentials",
    "normalize_server",
    "resolve_credentials",
    "save_credentials",
]

API = "/api/v1"
# Connecting should be quick; an answer may take long (a finish pulls images, a rollback
# rolls out), so only silence this long on an open connection counts as a failure.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 600.0


class NodeError(DockyardError):
    """A node refused a request or could not be reached.

    `status` is the node's HTTP status (0: no answer), `error_id` ties the message to the
    node's log, `fields` holds a 422's field errors.
    """

    public_message = None

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_id: str | None = None,
        fields: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id
        self.fields = fields or []


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dockyard" / "credentials.json"


def normalize_server(url: str) -> str:
    """`https://node.example:8788/` -> `https://node.example:8788`; a bare `host:port`
    gets `http://` (a node on loopback) and a bare host `https://`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        host = url.split("/", 1)[0]
        local = host.startswith(("127.", "localhost", "[::1]"))
        url = ("http://" if local else "https://") + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DockyardError(f"not a node URL: {url!r} (expected e.g. https://node.example:8788)")
    if parts.path not in ("", "/") or parts.query:
        raise DockyardError(f"give the node's address without a path: {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def save_credentials(credentials: Credentials, path: Path | None = None) -> Path:
    """Write the file 0600 (created that way, never readable by others even briefly)."""
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        json.dump({"server": credentials.server, "token": credentials.token}, file)
        file.write("\n")
    temp.replace(path)
    return path


def load_credentials(path: Path | None = None) -> Credentials | None:
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DockyardError(f"cannot read {path}: {exc}; run `dockyard login URL` again") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), str) for key in ("server", "token")
    ):
        raise DockyardError(f"{path} is not a credentials file; run `dockyard login URL` again")
    return Credentials(server=data["server"], token=data["token"])


def resolve_credentials(
    server: str | None = None, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """The server and token to use, or None when nothing names a server."""
    env = os.environ if environ is None else environ
    stored = load_credentials()
    chosen = server or env.get("DOCKYARD_SERVER") or (stored.server if stored else None)
    if not chosen:
        return None
    chosen = normalize_server(chosen)
    token = env.get("DOCKYARD_TOKEN")
    if not token and stored is not None and normalize_server(stored.server) == chosen:
        token = stored.token
    if not token:
        raise DockyardError(
            f"no token for {chosen}: run `dockyard login {chosen}` or set DOCKYARD_TOKEN"
        )
    return Credentials(server=chosen, token=token)


# -- the client -----------------------------------------------------------------------------


class NodeClient(AsyncClosing):
    """An async client for one node. Use as `async with NodeClient(server, token) as c:`."""

    def __init__(self, server: str, token: str) -> None:
        self.server = normalize_server(server)
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    @property
    def token(self) -> str:
        """The bearer token (the registry takes it as the password too)."""
        return self._token

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the loop that will own it.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
                ),
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        async with self._open(
            method, path, json_body=json_body, data=data, params=params, headers=headers
        ) as response:
            if response.status == 204:
                return None
            try:
                body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise NodeError(
                    f"the Dockyard node at {self.server} broke off its answer: {exc}",
                    status=response.status,
                ) from None
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise NodeError(
                f"{self.server} answered {method} {path} with something that is not JSON "
                "(is this a Dockyard node's admin address?)",
                status=response.status,
            ) from None

    def _open(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Exchange:
        return _Exchange(self, method, path, json_body, data, params, headers)

    async def _raise_for(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        text = await response.text(errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        message = body.get("error") if isinstance(body, dict) else None
        error_id = body.get("id") if isinstance(body, dict) else None
        fields = body.get("fields") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message:
            message = f"the node answered {response.status} {response.reason or ''}".strip()
        if response.status == 401:
            message = f"token rejected: run `dockyard login {self.server}` ({message})"
        elif response.status == 403:
            message = f"this token may not do that: {message}"
        if isinstance(fields, list):
            for field in fields:
                if isinstance(field, dict):
                    loc = ".".join(str(part) for part in field.get("loc") or [])
                    message += f"\n  {loc}: {field.get('msg', '')}" if loc else ""
        if isinstance(error_id, str) and error_id:
            message += f" (error id {error_id})"
        raise NodeError(
            message,
            status=response.status,
            error_id=error_id if isinstance(error_id, str) else None,
            fields=fields if isinstance(fields, list) else None,
        )

    # -- routes ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/health")
        return result

    async def node(self) -> dict[str, Any]:
        """The node's description; the cheapest authenticated call (login checks with it)."""
        result: dict[str, Any] = await self._request("GET", "/node")
        return result

    async def list_apps(self) -> list[dict[str, Any]]:
        return _items(await self._request("GET", "/apps"), "apps")

    async def get_app(self, app: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/apps/{_seg(app)}")
        return result

    async def delete_app(self, app: str) -> None:
        await self._request("DELETE", f"/apps/{_seg(app)}")

    async def begin_deploy(self, app: str, classes: list[str] | None = None) -> dict[str, Any]:
        """{"deploy_id", "registry", "repositories": {class: repo}}; 409 while another runs."""
        result: dict[str, Any] = await self._request(
            "POST", f"/apps/{_seg(app)}/deploys", json_body={"classes": list(classes or [])}
        )
        return result

    async def upload_bundle(self, app: str, deploy_id: str, bundle: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "PUT",
            f"/apps/{_seg(app)}/deploys/{_seg(deploy_id)}/bundle",
            data=bundle,
            headers={"Content-Type": "application/gzip"},
        )
        return result

    async def finish_deploy(
        self,
        app: str,
        deploy_id: str,
        *,
        images: Mapping[str, str],
        rollout: str,
        message: str,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._request(
            "POST",
            f"/apps/{_seg(app)}/deploys/{_seg(deploy_id)}/finish",
            json_body={"images": dict(images), "rollout": rollout, "message": message},
        )
        return result

    async def abort_deploy(self, app: str, deploy_id: str) -> None:
        await self._request("DELETE", f"/apps/{_seg(app)}/deploys/{_seg(deploy_id)}")

    async def list_versions(self, app: str) -> list[dict[str, Any]]:
        return _items(await self._request("GET", f"/apps/{_seg(app)}/versions"), "versions")

    async def rollback(
        self, app: str, version: int | None = None, *, rollout: str = "gradual"
    ) -> dict[str, Any]:
        """Activate `version` (None: the one before the active one)."""
        result: dict[str, Any] = await self._request(
            "POST",
            f"/apps/{_seg(app)}/rollback",
            json_body={"version": version, "rollout": rollout},
        )
        return result

    async def rollout(self, app: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request("GET", f"/apps/{_seg(app)}/rollout")
        if isinstance(result, dict) and "rollout" in result and "state" not in result:
            inner: dict[str, Any] | None = result["rollout"]
            return inner
        return result

    async def list_secrets(self, app: str) -> list[str]:
        found = _items(await self._request("GET", f"/apps/{_seg(app)}/secrets"), "secrets")
        return [item if isinstance(item, str) else str(item.get("name")) for item in found]

    async def put_secret(self, app: str, name: str, value: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "PUT", f"/apps/{_seg(app)}/secrets/{_seg(name)}", json_body={"value": value}
        )
        return result

    async def delete_secret(self, app: str, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "DELETE", f"/apps/{_seg(app)}/secrets/{_seg(name)}"
        )
        return result

    async def list_containers(self, app: str) -> list[dict[str, Any]]:
        return _items(await self._request("GET", f"/apps/{_seg(app)}/containers"), "containers")

    async def get_container(self, container_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/containers/{_seg(container_id)}")
        return result

    async def container_logs(
        self, container_id: str, *, tail: int | None = None, follow: bool = False
    ) -> AsyncIterator[str]:
        """The container's output, line by line (as it comes, with `follow`)."""
        params = {"follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = str(tail)
        async with self._open(
            "GET", f"/containers/{_seg(container_id)}/logs", params=params
        ) as response:
            if response.content_type == "application/json":
                for line in _items(await response.json(), "lines"):
                    yield str(line)
                return
            pending = b""
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")

    async def logs(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Stored log records matching ``params`` (the query of GET /logs), oldest first."""
        return [
            dict(r) for r in _items(await self._request("GET", "/logs", params=params), "records")
        ]

    async def tail(self, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Log records as they come (GET /logs/tail), until the caller stops reading."""
        async with self._open("GET", "/logs/tail", params=params) as response:
            pending = b""
            async for chunk in response.content.iter_any():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():  # blank lines keep the connection open
                        yield json.loads(line)

    async def usage(self, params: Mapping[str, str]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/usage", params=params)
        return result

    async def exec(self, container_id: str, cmd: list[str]) -> dict[str, Any]:
        """{"exit_code", "stdout", "stderr"} of a command run to its end."""
        result: dict[str, Any] = await self._request(
            "POST", f"/containers/{_seg(container_id)}/exec", json_body={"cmd": cmd}
        )
        return result

    async def stop_container(self, container_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._request(
            "POST", f"/containers/{_seg(container_id)}/stop"
        )
        return result

    async def list_images(self) -> list[dict[str, Any]]:
        return _items(await self._request("GET", "/images"), "images")

    async def prune_images(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", "/images/prune") or {}
        return result

    async def rotate_token(self) -> str:
        result = await self._request("POST", "/tokens/rotate")
        token = result.get("token") if isinstance(result, dict) else None
        if not isinstance(token, str):
            raise NodeError("the node's answer to a token rotation has no token")
        return token


class _Exchange:
    """`async with` one request: the response, once its status says success."""

    def __init__(
        self,
        client: NodeClient,
        method: str,
        path: str,
        json_body: Any,
        data: bytes | None,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._client = client
        self._method = method
        self._url = client.server + API + path
        self._kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if json_body is not None:
            self._kwargs["json"] = json_body
        elif data is not None:
            self._kwargs["data"] = data
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        server = self._client.server
        try:
            response = await self._client._client().request(
                self._method, self._url, allow_redirects=False, **self._kwargs
            )
        except aiohttp.ClientConnectorError as exc:
            raise NodeError(
                f"cannot reach the Dockyard node at {server} ({exc.os_error.strerror or exc})"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise NodeError(
                f"the Dockyard node at {server} did not answer: {type(exc).__name__} {exc}"
            ) from None
        self._response = response
        try:
            await self._client._raise_for(response)
        except BaseException:
            response.release()
            raise
        return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            self._response.release()


def _seg(value: str) -> str:
    """A path segment, quoted so a name can never change the route."""
    return quote(value, safe="")


def _items(result: Any, key: str) -> list[Any]:
    """A listing: the node may answer a bare list or `{key: [...]}`."""
    if isinstance(result, list):
        return result
    if isinstance(result, dict) and isinstance(result.get(key), list):
        return list(result[key])
    raise NodeError(f"unexpected answer from the node (expected a list of {key})")
