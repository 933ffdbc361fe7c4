"""The dashboard's aiohttp application: routes, the session/CSRF guard, error pages.

``make_dashboard(source, prefix="/ui")`` returns an application to mount with
``parent.add_subapp(prefix, dashboard)``. Its one middleware does, in order:

- sessions: every route but the login page and static files needs a logged-in session
  (a GET without one is sent to the login page; anything else is 403);
- CSRF: every POST carries the session's token in a ``csrf`` form field (403 otherwise);
- errors: an exception becomes a plain page with a reference id; the detail goes to the
  log only, never to the browser;
- headers: a strict Content-Security-Policy (own scripts and styles only), no framing,
  no caching of pages.

Sessions live in this process only: a node restart logs everyone out, which is also what
``logout_everyone`` does on demand (after the admin token is rotated).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from dockyard.observe.dashboard.formats import FILTERS
from dockyard.observe.dashboard.sessions import Session, Sessions
from dockyard.observe.dashboard.source import DashboardSource
from dockyard.observe.records import LEVELS

__all__ = ["COOKIE", "DASHBOARD", "SESSION", "Dashboard", "logout_everyone", "make_dashboard"]

log = logging.getLogger(__name__)

COOKIE = "dockyard_session"
HERE = Path(__file__).parent
# Routes open without a session.
PUBLIC_ROUTES = frozenset({"login", "login_post", "static"})
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
ERROR_TEXT = {
    400: ("Bad request", "The request could not be understood."),
    401: ("Not logged in", "Log in to see this page."),
    403: (
        "Refused",
        "This form has expired or did not come from this dashboard. "
        "Go back, reload the page and try again.",
    ),
    404: ("Not found", "There is nothing here. It may have been removed."),
    405: ("Not allowed", "This page cannot be used that way."),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Dashboard:
    """What every handler shares: the source, sessions, templates and settings."""

    source: DashboardSource
    prefix: str
    poll_interval: float
    sessions: Sessions = field(default_factory=Sessions)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    templates: jinja2.Environment = field(init=False)

    def __post_init__(self) -> None:
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(FILTERS)
        self.templates.globals["prefix"] = self.prefix
        self.templates.globals["levels"] = LEVELS

    def url(self, *parts: str, **query: str) -> str:
        """A dashboard URL; path parts and query values are percent-encoded."""
        path = "/".join(quote(part, safe="") for part in parts)
        url = f"{self.prefix}/{path}"
        pairs = {k: v for k, v in query.items() if v}
        return f"{url}?{urlencode(pairs)}" if pairs else url

    def render_fragment(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(url=self.url, **context)

    def render(
        self, request: web.Request, name: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        session = request.get(SESSION)
        context.setdefault("nav", "")
        html = self.templates.get_template(name).render(
            url=self.url,
            csrf=session.csrf if session else "",
            logged_in=bool(session and session.authenticated),
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html")

    def error_page(self, request: web.Request, status: int, reference: str = "") -> web.Response:
        title, text = ERROR_TEXT.get(status, ("Something went wrong", "Try again later."))
        return self.render(
            request, "error.html", status=status, title=title, text=text, reference=reference
        )

    def set_session_cookie(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        response.set_cookie(
            COOKIE,
            session.id,
            path=self.prefix or "/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=int(self.sessions.lifetime),
        )

    def clear_session_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path=self.prefix or "/")


DASHBOARD = web.AppKey("dashboard", Dashboard)
# The request's session (None when the browser sent no live session cookie).
SESSION: web.RequestKey[Session | None] = web.RequestKey("dashboard_session")


def make_dashboard(
    source: DashboardSource, *, prefix: str = "/ui", poll_interval: float = 1.0
) -> web.Application:
    """The dashboard for `source`, to mount with ``add_subapp(prefix, ...)``.
    `poll_interval`: how often live pages ask the source for instance states."""
    from dockyard.observe.dashboard import live, views

    dashboard = Dashboard(source=source, prefix=prefix.rstrip("/"), poll_interval=poll_interval)
    app = web.Application(middlewares=[_guard])
    app[DASHBOARD] = dashboard

    async def on_shutdown(_: web.Application) -> None:
        dashboard.closing.set()  # live streams end instead of holding the shutdown

    app.on_shutdown.append(on_shutdown)
    app.add_routes(
        [
            web.get("/", views.overview, name="overview"),
            web.get("/login", views.login_page, name="login"),
            web.post("/login", views.login, name="login_post"),
            web.post("/logout", views.logout, name="logout"),
            web.get("/apps/{app}", views.app_page, name="app"),
            web.get("/apps/{app}/live", live.app_stream, name="app_live"),
            web.get("/apps/{app}/instances/{cid}", views.instance_page, name="instance"),
            web.get("/apps/{app}/instances/{cid}/live", live.instance_stream, name="inst_live"),
            web.get("/apps/{app}/instances/{cid}/stop", views.stop_confirm, name="stop_confirm"),
            web.post("/apps/{app}/instances/{cid}/stop", views.stop, name="stop"),
            web.get("/logs", views.logs_page, name="logs"),
            web.get("/logs/live", live.logs_stream, name="logs_live"),
            web.get("/usage", views.usage_page, name="usage"),
            web.static("/static", HERE / "static", name="static"),
        ]
    )
    return app


def logout_everyone(dashboard_app: web.Application) -> None:
    """End every dashboard session (call it when the admin token is rotated)."""
    dashboard_app[DASHBOARD].sessions.end_all()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    try:
        response = await _checked(dashboard, request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        response = dashboard.error_page(request, exc.status)
    except Exception:
        reference = secrets.token_hex(4)
        log.exception(
            "Dashboard error (reference %s) on %s %s", reference, request.method, request.path
        )
        response = dashboard.error_page(request, 500, reference)
    if not response.prepared:  # a live stream sets its own headers before it starts
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _checked(
    dashboard: Dashboard, request: web.Request, handler: Handler
) -> web.StreamResponse:
    session = dashboard.sessions.get(request.cookies.get(COOKIE))
    request[SESSION] = session
    route = request.match_info.route.name
    if route not in PUBLIC_ROUTES and not (session and session.authenticated):
        if request.method in ("GET", "HEAD") and not route_is_stream(route):
            target = request.path_qs
            raise web.HTTPSeeOther(dashboard.url("login", next=target))
        return dashboard.error_page(request, 401 if request.method == "GET" else 403)
    if request.method == "POST":
        form = await request.post()
        token = form.get("csrf")
        if session is None or not isinstance(token, str) or not session.csrf_matches(token):
            return dashboard.error_page(request, 403)
    return await handler(request)


def route_is_stream(route: str | None) -> bool:
    return route is not None and route.endswith("_live")
