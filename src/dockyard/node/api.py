"""The control plane on the admin listener: JSON under ``/api/v1`` and the registry on ``/v2/``.

``make_admin_app(node)`` builds the aiohttp application; the node serves it. Two
middlewares sit in front of every route:

- errors (outermost): every failure becomes ``{"error": str, "id": str}`` (plus
  ``fields`` for a 422) with the error's status. The text is the error's ``public``
  message, never a trace, a node path or a secret; the full detail and traceback go to
  the log under the same id, so an operator can find what a user saw.
- auth: ``Authorization: Bearer <token>``. No or an unknown token is 401 with
  ``WWW-Authenticate: Bearer realm="dockyard"``; a "read" token on POST/PUT/DELETE is
  403. ``/api/v1/health`` is open; ``/metrics`` needs a token like the API; ``/v2/``
  does its own (registry) auth, and the dashboard (``/ui/``) its own session login.

Routes are thin: they parse a model from models.py, call the node (``NodeControl``) or the
deploy flows (deploys.py), and answer a model. docs/api.md lists them all. (Over 400
lines only because there are 25 routes; each handler is a few lines.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..containers.runtime import ContainerInfo
from ..errors import ContainerGone, DockyardError, error_id
from .deploys import (
    DEPLOY_LOCK_TTL,
    Deploys,
    InvalidInput,
    NodeControl,
    NotFound,
    VersionChange,
)
from .models import (
    AppDetailOut,
    AppOut,
    AppsOut,
    BundleOut,
    ContainerOut,
    ContainersOut,
    DeployBeginIn,
    DeployBeginOut,
    ErrorOut,
    ExecIn,
    ExecOut,
    FieldError,
    FinishIn,
    HealthOut,
    ImageOut,
    ImagesOut,
    LogsOut,
    NodeOut,
    PruneOut,
    RollbackIn,
    RolloutOut,
    SecretChangeOut,
    SecretIn,
    SecretsOut,
    StoppedOut,
    TokenOut,
    VersionChangeOut,
    VersionOut,
    VersionsOut,
)
from .paths import APP_NAME_RULE, validate_app_name

__all__ = ["API_PREFIX", "NodeControl", "make_admin_app"]

log = logging.getLogger("dockyard.node.api")

API_PREFIX = "/api/v1"
# JSON bodies are small; the bundle upload streams and has its own limit.
MAX_JSON_BODY = 1024 * 1024
_UPLOAD_CHUNK = 256 * 1024
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_OPEN_PATHS = frozenset({f"{API_PREFIX}/health"})
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_REALM = 'Bearer realm="dockyard"'

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unauthorized(DockyardError):
    status = 401
    public_message = None


class Forbidden(DockyardError):
    status = 403
    public_message = None


def make_admin_app(node: NodeControl, *, lock_ttl: float | None = None) -> web.Application:
    """The admin listener's application for `node`."""
    if lock_ttl is None:
        # The node's NodeSettings.deploy_lock_ttl when it has settings.
        settings = getattr(node, "settings", None)
        lock_ttl = float(getattr(settings, "deploy_lock_ttl", DEPLOY_LOCK_TTL))
    api = _Api(node, Deploys(node, lock_ttl=lock_ttl))
    app = web.Application(middlewares=[api.errors, api.auth], client_max_size=MAX_JSON_BODY)
    p = API_PREFIX
    routes = [
        web.get(f"{p}/health", api.health),
        web.get(f"{p}/node", api.node_info),
        web.get(f"{p}/apps", api.list_apps),
        web.get(f"{p}/apps/{{app}}", api.get_app),
        web.delete(f"{p}/apps/{{app}}", api.delete_app),
        web.post(f"{p}/apps/{{app}}/deploys", api.begin_deploy),
        web.put(f"{p}/apps/{{app}}/deploys/{{id}}/bundle", api.upload_bundle),
        web.post(f"{p}/apps/{{app}}/deploys/{{id}}/finish", api.finish_deploy),
        web.delete(f"{p}/apps/{{app}}/deploys/{{id}}", api.abort_deploy),
        web.get(f"{p}/apps/{{app}}/versions", api.list_versions),
        web.post(f"{p}/apps/{{app}}/rollback", api.rollback),
        web.get(f"{p}/apps/{{app}}/rollout", api.rollout),
        web.get(f"{p}/apps/{{app}}/secrets", api.list_secrets),
        web.put(f"{p}/apps/{{app}}/secrets/{{name}}", api.put_secret),
        web.delete(f"{p}/apps/{{app}}/secrets/{{name}}", api.delete_secret),
        web.get(f"{p}/apps/{{app}}/containers", api.list_containers),
        web.get(f"{p}/containers/{{id}}", api.get_container),
        web.get(f"{p}/containers/{{id}}/logs", api.container_logs),
        web.post(f"{p}/containers/{{id}}/exec", api.exec_container),
        web.post(f"{p}/containers/{{id}}/stop", api.stop_container),
        web.get(f"{p}/images", api.list_images),
        web.post(f"{p}/images/prune", api.prune_images),
        web.post(f"{p}/tokens/rotate", api.rotate_token),
        web.route("*", "/v2", api.registry),
        web.route("*", "/v2/{tail:.*}", api.registry),
    ]
    app.add_routes(routes)
    return app


class _Api:
    def __init__(self, node: NodeControl, deploys: Deploys) -> None:
        self.node = node
        self.deploys = deploys
        self._proxy: Handler | None = None

    # -- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own: unknown route, wrong method, a JSON body over the limit.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(request, exc.status, exc.reason, detail=exc.text, headers=headers)
        except InvalidInput as exc:
            fields = [FieldError.model_validate(field) for field in exc.fields]
            return _error(request, exc.status, exc.public, fields=fields, detail=exc.message)
        except Unauthorized as exc:
            return _error(request, 401, exc.public, headers={"WWW-Authenticate": _REALM})
        except DockyardError as exc:
            return _error(request, exc.status, exc.public, detail=exc.message, exc=exc)
        except Exception as exc:
            return _error(request, 500, "internal error", detail=repr(exc), exc=exc)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in _OPEN_PATHS or not (path.startswith(API_PREFIX + "/") or path == "/metrics"):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        scope = self.node.tokens.scope(token.strip()) if scheme.lower() == "bearer" else None
        if scope is None:
            raise Unauthorized("a valid bearer token is required")
        if scope != "admin" and request.method in _WRITE_METHODS:
            raise Forbidden(f"a {scope} token may not {request.method} {path}")
        return await handler(request)

    # -- node -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return _json(HealthOut())

    async def node_info(self, request: web.Request) -> web.Response:
        node = self.node
        return _json(
            NodeOut(
                owner=node.owner,
                registry=node.admin_address,
                apps=len(node.store.list_apps()),
                max_upload_bytes=node.max_upload_bytes,
            )
        )

    # -- apps -----------------------------------------------------------------------------

    def _app(self, request: web.Request) -> str:
        """The path's app, which must exist (404 otherwise, also for a malformed name)."""
        name = _app_param(request, create=False)
        if self.node.store.get_app(name) is None:
            raise NotFound(f"no app {name!r}")
        return name

    async def list_apps(self, request: web.Request) -> web.Response:
        return _json(AppsOut(apps=[AppOut.from_record(a) for a in self.node.store.list_apps()]))

    async def get_app(self, request: web.Request) -> web.Response:
        store = self.node.store
        record = store.get_app(self._app(request))
        assert record is not None
        versions = store.list_versions(record.name)
        active = next((v for v in versions if v.number == record.active_version), None)
        return _json(
            AppDetailOut(
                name=record.name,
                created_at=record.created_at,
                active_version=record.active_version,
                version=VersionOut.from_record(active, record.active_version) if active else None,
                versions=len(versions),
                secrets=store.secret_names(record.name),
                rollout=RolloutOut.from_record(store.get_rollout(record.name)),
            )
        )

    async def delete_app(self, request: web.Request) -> web.Response:
        name = self._app(request)
        await self.node.delete_app(name)
        self.deploys.open_apps.discard(name)  # its deploy lock went with it
        log.info("App %s deleted", name)
        return web.Response(status=204)

    # -- deploys --------------------------------------------------------------------------

    async def begin_deploy(self, request: web.Request) -> web.Response:
        name = _app_param(request, create=True)
        body = await _body(request, DeployBeginIn)
        begun = self.deploys.begin(name, body.classes)
        return _json(DeployBeginOut.model_validate(begun), status=201)

    async def upload_bundle(self, request: web.Request) -> web.Response:
        name = _app_param(request, create=False)
        result = await self.deploys.upload(
            name,
            request.match_info["id"],
            lambda: request.content.read(_UPLOAD_CHUNK),
            request.content_length,
        )
        return _json(BundleOut.model_validate(result))

    async def finish_deploy(self, request: web.Request) -> web.Response:
        name = _app_param(request, create=False)
        body = await _body(request, FinishIn)
        change = await self.deploys.finish(
            name, request.match_info["id"], dict(body.images), body.rollout, body.message
        )
        return _json(_change(change), status=201)

    async def abort_deploy(self, request: web.Request) -> web.Response:
        name = _app_param(request, create=False)
        await self.deploys.abort(name, request.match_info["id"])
        return web.Response(status=204)

    # -- versions and rollouts ------------------------------------------------------------

    async def list_versions(self, request: web.Request) -> web.Response:
        name = self._app(request)
        store = self.node.store
        active = store.get_app(name)
        number = active.active_version if active is not None else None
        versions = [VersionOut.from_record(v, number) for v in store.list_versions(name)]
        return _json(VersionsOut(versions=versions))

    async def rollback(self, request: web.Request) -> web.Response:
        name = self._app(request)
        body = await _body(request, RollbackIn)
        change = await self.deploys.rollback(name, body.version, body.rollout)
        return _json(_change(change), status=201)

    async def rollout(self, request: web.Request) -> web.Response:
        name = self._app(request)
        rollout = RolloutOut.from_record(self.node.store.get_rollout(name))
        # The rollout itself, or JSON null when the app never had one.
        return _json(rollout) if rollout is not None else web.json_response(None)

    # -- secrets --------------------------------------------------------------------------

    async def list_secrets(self, request: web.Request) -> web.Response:
        name = self._app(request)
        return _json(SecretsOut(secrets=self.node.store.secret_names(name)))

    async def put_secret(self, request: web.Request) -> web.Response:
        # Secrets may be put before the first deploy: this creates the app.
        name = _app_param(request, create=True)
        body = await _body(request, SecretIn)
        secret = request.match_info["name"]
        result = await self.deploys.put_secret(name, secret, body.value)
        return _json(_secret_change(secret, result))

    async def delete_secret(self, request: web.Request) -> web.Response:
        name = self._app(request)
        secret = request.match_info["name"]
        result = await self.deploys.delete_secret(name, secret)
        return _json(_secret_change(secret, result))

    # -- containers -----------------------------------------------------------------------

    def _labels(self, app: str) -> dict[str, str]:
        return {"dockyard.app": app, "dockyard.owner": self.node.owner}

    async def _container(self, request: web.Request) -> ContainerInfo:
        """The path's container, only when this node's apps own it: any other container
        (another node's, or not Dockyard's) is 404, exactly like one that does not exist."""
        container_id = request.match_info["id"]
        info = None
        if _CONTAINER_ID.fullmatch(container_id):
            with contextlib.suppress(ContainerGone):
                info = await self.node.runtime.inspect(container_id)
        if (
            info is None
            or info.labels.get("dockyard.owner") != self.node.owner
            or not info.labels.get("dockyard.app")
        ):
            raise NotFound(f"no container {container_id!r}")
        return info

    async def list_containers(self, request: web.Request) -> web.Response:
        name = self._app(request)
        found = await self.node.runtime.list(self._labels(name))
        return _json(ContainersOut(containers=[ContainerOut.from_info(i) for i in found]))

    async def get_container(self, request: web.Request) -> web.Response:
        return _json(ContainerOut.from_info(await self._container(request)))

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        info = await self._container(request)
        follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
        tail = _tail(request.query.get("tail"))
        lines = self.node.runtime.logs(info.id, follow=follow, tail=tail)
        if not follow:
            try:
                collected = [line async for line in lines]
            except ContainerGone:
                raise NotFound(f"no container {info.id!r}") from None
            return _json(LogsOut(lines=collected))
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for line in lines:
                await response.write(line.encode("utf-8", "replace") + b"\n")
        except (ConnectionResetError, ContainerGone):
            pass  # the client left, or the container went away: the stream just ends
        except DockyardError as exc:
            # Too late for a status: log it, and end the stream with the error's id.
            ident = error_id()
            log.error("Logs of %s broke off [%s]: %s", info.id, ident, exc.message)
            with contextlib.suppress(ConnectionResetError):
                await response.write(f"[error {ident}: {exc.public}]\n".encode())
        finally:
            aclose = getattr(lines, "aclose", None)
            if aclose is not None:
                await aclose()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def exec_container(self, request: web.Request) -> web.Response:
        info = await self._container(request)
        body = await _body(request, ExecIn)
        result = await self.node.runtime.exec(info.id, body.cmd)
        return _json(
            ExecOut(
                exit_code=result.exit_code,
                stdout=result.stdout.decode("utf-8", "replace"),
                stderr=result.stderr.decode("utf-8", "replace"),
            )
        )

    async def stop_container(self, request: web.Request) -> web.Response:
        info = await self._container(request)
        await self.node.stop_container(info)
        log.info("Container %s of %s stopped by the API", info.id, info.labels["dockyard.app"])
        return _json(StoppedOut(id=info.id))

    # -- images and tokens ----------------------------------------------------------------

    async def _images(self) -> list[ImageOut]:
        referenced = self.node.store.referenced_images()
        images = []
        for entry in await self.node.registry.catalog():
            images.append(
                ImageOut(
                    repo=entry.repo,
                    tags=list(entry.tags),
                    digest=entry.digest,
                    size=entry.size,
                    referenced=f"{entry.repo}@{entry.digest}" in referenced,
                )
            )
        return images

    async def list_images(self, request: web.Request) -> web.Response:
        return _json(ImagesOut(images=await self._images()))

    async def prune_images(self, request: web.Request) -> web.Response:
        """Delete every image no version names, except in repositories of apps with a
        deploy under way (their new images are pushed before a version names them)."""
        images = await self._images()
        busy = self.deploys.open_apps
        deleted = []
        for image in images:
            app = image.repo.split("/", 1)[0]
            if image.referenced or app in busy:
                continue
            await self.node.registry.delete(image.repo, image.digest)
            deleted.append(f"{image.repo}@{image.digest}")
        if deleted:
            await self.node.registry.garbage_collect()
        log.info("Pruned %d images", len(deleted))
        return _json(PruneOut(deleted=deleted, kept=len(images) - len(deleted)))

    async def rotate_token(self, request: web.Request) -> web.Response:
        token = self.node.tokens.rotate()
        self.node.tokens_rotated()
        log.info("Admin token rotated; every earlier token is revoked")
        return _json(TokenOut(token=token))

    # -- the registry ---------------------------------------------------------------------

    async def registry(self, request: web.Request) -> web.StreamResponse:
        if self._proxy is None:
            # Built on first use: the node starts its registry before it serves.
            from .registry import Registry, registry_proxy

            # The node's registry is a Registry; the Protocol only names what the API calls.
            registry = cast(Registry, self.node.registry)
            self._proxy = registry_proxy(registry, self.node.tokens.scope)
        return await self._proxy(request)


# -- helpers --------------------------------------------------------------------------------


def _app_param(request: web.Request, *, create: bool) -> str:
    """The path's app name. Malformed: 422 where the call would create the app, else 404
    (no such app can exist)."""
    name = request.match_info["app"]
    try:
        return validate_app_name(name)
    except DockyardError:
        if create:
            raise InvalidInput(
                "invalid app name", [{"loc": ["path", "app"], "msg": APP_NAME_RULE}]
            ) from None
        raise NotFound(f"no app {name!r}") from None


async def _body(request: web.Request, model: type[M]) -> M:
    """The JSON body as `model`: 422 with field errors (never the offending values)."""
    raw = await request.read()
    try:
        data: Any = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise InvalidInput(
            "the request body is not JSON", [{"loc": ["body"], "msg": "invalid JSON"}]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [
            {"loc": ["body", *error["loc"]], "msg": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise InvalidInput("invalid request body", fields) from None


def _tail(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise InvalidInput(
            "invalid tail", [{"loc": ["query", "tail"], "msg": "a whole number of lines"}]
        )
    return int(value)


def _change(change: VersionChange) -> VersionChangeOut:
    active = change.version.number
    return VersionChangeOut(
        version=VersionOut.from_record(change.version, active),
        changes=change.changes,
        rollout=RolloutOut.from_record(change.rollout),
    )


def _secret_change(name: str, result: VersionChange | list[str]) -> SecretChangeOut:
    if isinstance(result, list):
        return SecretChangeOut(name=name, version=None, changes=result)
    active = result.version.number
    return SecretChangeOut(
        name=name,
        version=VersionOut.from_record(result.version, active),
        changes=result.changes,
    )


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def _error(
    request: web.Request,
    status: int,
    message: str,
    *,
    detail: str | None = None,
    fields: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    exc: BaseException | None = None,
) -> web.Response:
    """The one place an error becomes a response; the log line carries the same id."""
    ident = error_id()
    where = f"{request.method} {request.path}"
    if status >= 500:
        log.error("%s -> %d [%s]: %s", where, status, ident, detail or message, exc_info=exc)
    else:
        log.info("%s -> %d [%s]: %s", where, status, ident, detail or message)
    body = ErrorOut(error=message, id=ident, fields=fields)
    response = web.Response(
        text=body.model_dump_json(exclude_none=True),
        status=status,
        content_type="application/json",
        headers=headers,
    )
    return response
