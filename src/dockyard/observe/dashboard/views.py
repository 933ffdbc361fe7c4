"""The pages: login/logout, overview, app, instance (with the stop/destroy confirmation),
logs explorer and usage. Each handler asks the source, then renders one template."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from dockyard.observe.dashboard import charts, formats
from dockyard.observe.dashboard.app import DASHBOARD, SESSION, Dashboard
from dockyard.observe.dashboard.sessions import Session
from dockyard.observe.records import LEVELS, LogQuery, LogRecord

__all__ = [
    "SINCE_CHOICES",
    "app_page",
    "instance_page",
    "login",
    "login_page",
    "logout",
    "logs_page",
    "logs_query",
    "overview",
    "stop",
    "stop_confirm",
    "usage_page",
]

# (form value, label, seconds back)
SINCE_CHOICES = (
    ("5m", "Last 5 minutes", 300),
    ("1h", "Last hour", 3600),
    ("6h", "Last 6 hours", 6 * 3600),
    ("24h", "Last 24 hours", 86400),
    ("7d", "Last 7 days", 7 * 86400),
    ("30d", "Last 30 days", 30 * 86400),
)
USAGE_GROUPS = (("app", "App"), ("class", "Class"), ("day", "Day"))
NOTICES = {
    "stopped": "Stop requested. The instance stops after its grace period.",
    "destroyed": "The instance was destroyed.",
}
LOG_LIMIT = 500
MIB = 1 << 20
# With no line on the page, its live stream catches up on lines this recent.
CATCH_UP_SECONDS = 60.0


def _dash(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


def _after(records: list[LogRecord], since: float | None = None) -> str:
    """Where a page's live log stream starts: after the newest line the page shows."""
    if records:
        return repr(records[-1].time)
    return repr(since if since is not None else time.time() - CATCH_UP_SECONDS)


def _since(value: str | None, default: str | None = None) -> float | None:
    for key, _, seconds in SINCE_CHOICES:
        if key == (value or default):
            return time.time() - seconds
    return None


def _session(request: web.Request) -> Session:
    session = request[SESSION]
    assert session is not None  # the guard let a POST through only with one
    return session


# -- login -------------------------------------------------------------------------------


def _safe_next(dashboard: Dashboard, target: str | None) -> str:
    """Only a path inside the dashboard: never another site after logging in."""
    home = dashboard.url("")
    if not target or "\\" in target or target.startswith("//"):
        return home
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return home
    if target == dashboard.prefix or target.startswith(dashboard.prefix + "/"):
        return target
    return home


async def login_page(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    session = request[SESSION]
    if session is not None and session.authenticated:
        raise web.HTTPSeeOther(_safe_next(dashboard, request.query.get("next")))
    if session is None:
        session = dashboard.sessions.create(authenticated=False)
        request[SESSION] = session
    response = dashboard.render(
        request, "login.html", next=_safe_next(dashboard, request.query.get("next")), error=""
    )
    dashboard.set_session_cookie(request, response, session)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    form = await request.post()
    token = form.get("token")
    target = _safe_next(dashboard, str(form.get("next") or ""))
    if (
        not isinstance(token, str)
        or not token.strip()
        or not dashboard.source.check_token(token.strip())
    ):
        return dashboard.render(
            request,
            "login.html",
            status=401,
            next=target,
            error="That token was not accepted. Check it and try again.",
        )
    # A fresh id: the anonymous session's id is never trusted after login.
    dashboard.sessions.end(_session(request).id)
    session = dashboard.sessions.create(authenticated=True)
    response = web.HTTPSeeOther(target)
    dashboard.set_session_cookie(request, response, session)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    dashboard.sessions.end(_session(request).id)
    response = web.HTTPSeeOther(dashboard.url("login"))
    dashboard.clear_session_cookie(response)
    raise response


# -- overview, app, instance ---------------------------------------------------------------


async def overview(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    apps = sorted(await dashboard.source.overview(), key=lambda a: a.name)
    totals = {
        "requests_per_minute": sum(a.requests_per_minute for a in apps),
        "live_instances": sum(a.live_instances for a in apps),
        "cost_today": sum(a.cost_today for a in apps),
    }
    cost_chart = charts.bar_chart(
        [(a.name, a.cost_today) for a in apps],
        chart_id="cost-today",
        title="Cost today by app",
        fmt=formats.usd,
    )
    return dashboard.render(
        request, "overview.html", nav="overview", apps=apps, totals=totals, cost_chart=cost_chart
    )


async def app_page(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    name = request.match_info["app"]
    detail = await dashboard.source.app_detail(name)
    if detail is None:
        raise web.HTTPNotFound()
    rows = await dashboard.source.instances(name)
    return dashboard.render(
        request,
        "app.html",
        nav="overview",
        app=detail,
        rows=rows,
        now=time.time(),
        notice=NOTICES.get(request.query.get("done", ""), ""),
    )


async def instance_page(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    app, cid = request.match_info["app"], request.match_info["cid"]
    detail = await dashboard.source.instance(app, cid)
    if detail is None:
        raise web.HTTPNotFound()
    records = dashboard.source.logs(LogQuery(app=app, container_id=cid, limit=200))
    samples = detail.samples
    cpu_chart = charts.line_chart(
        [(t, cpu) for t, cpu, _ in samples], chart_id="cpu", title="CPU", fmt=formats.percent
    )
    # In MiB, so that the axis ends on a round number of MiB.
    memory_chart = charts.line_chart(
        [(t, mem / MIB) for t, _, mem in samples],
        chart_id="memory",
        title="Memory",
        fmt=lambda value: formats.mib(value * MIB),
    )
    return dashboard.render(
        request,
        "instance.html",
        nav="overview",
        app=app,
        row=detail.row,
        now=time.time(),
        records=records,
        live_url=dashboard.url("apps", app, "instances", cid, "live", after=_after(records)),
        cpu_chart=cpu_chart,
        memory_chart=memory_chart,
        notice=NOTICES.get(request.query.get("done", ""), ""),
    )


async def stop_confirm(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    app, cid = request.match_info["app"], request.match_info["cid"]
    detail = await dashboard.source.instance(app, cid)
    if detail is None:
        raise web.HTTPNotFound()
    destroy = request.query.get("destroy") == "1"
    return dashboard.render(
        request, "confirm.html", nav="overview", app=app, row=detail.row, destroy=destroy
    )


async def stop(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    app, cid = request.match_info["app"], request.match_info["cid"]
    form = await request.post()
    destroy = form.get("destroy") == "1"
    try:
        await dashboard.source.stop_instance(app, cid, destroy=destroy)
    except LookupError:
        raise web.HTTPNotFound() from None
    if destroy:
        raise web.HTTPSeeOther(dashboard.url("apps", app, done="destroyed"))
    raise web.HTTPSeeOther(dashboard.url("apps", app, "instances", cid, done="stopped"))


# -- logs ------------------------------------------------------------------------------------


def logs_query(params: Any, *, limit: int = LOG_LIMIT) -> tuple[LogQuery, dict[str, str]]:
    """The LogQuery a logs form describes, and the form's values to show it again."""
    values = {
        name: str(params.get(name, "")).strip()
        for name in ("app", "class", "object", "container", "level", "text", "since", "live")
    }
    if values["level"] not in LEVELS:
        values["level"] = ""
    if values["since"] not in {key for key, _, _ in SINCE_CHOICES}:
        values["since"] = ""
    query = LogQuery(
        app=values["app"] or None,
        class_name=values["class"] or None,
        object_id=values["object"] or None,
        container_id=values["container"] or None,
        level=values["level"] or None,
        text=values["text"] or None,
        since=_since(values["since"]),
        limit=limit,
    )
    return query, values


async def logs_page(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    query, values = logs_query(request.query)
    records = dashboard.source.logs(query)
    live_values = {k: v for k, v in values.items() if k not in ("since", "live")}
    apps = sorted(a.name for a in await dashboard.source.overview())
    return dashboard.render(
        request,
        "logs.html",
        nav="logs",
        records=records,
        values=values,
        apps=apps,
        levels=LEVELS,
        since_choices=SINCE_CHOICES,
        live_url=dashboard.url("logs", "live", after=_after(records, query.since), **live_values),
        limit=LOG_LIMIT,
    )


# -- usage -----------------------------------------------------------------------------------


async def usage_page(request: web.Request) -> web.StreamResponse:
    dashboard = _dash(request)
    by = request.query.get("by", "app")
    if by not in {key for key, _ in USAGE_GROUPS}:
        by = "app"
    since_key = request.query.get("since", "30d")
    if since_key not in {key for key, _, _ in SINCE_CHOICES} | {"all"}:
        since_key = "30d"
    app = request.query.get("app", "").strip() or None
    rows = dashboard.source.usage(app=app, since=_since(since_key), by=by)
    rows = (
        sorted(rows, key=lambda r: r.key)
        if by == "day"
        else sorted(rows, key=lambda r: (-r.cost_usd, r.key))
    )
    chart = charts.bar_chart(
        [(r.key, r.cost_usd) for r in rows],
        chart_id="usage-cost",
        title=f"Cost by {by}",
        fmt=formats.usd,
    )
    apps = sorted(a.name for a in await dashboard.source.overview())
    return dashboard.render(
        request,
        "usage.html",
        nav="usage",
        rows=rows,
        by=by,
        groups=USAGE_GROUPS,
        since=since_key,
        since_choices=SINCE_CHOICES,
        app=app or "",
        apps=apps,
        chart=chart,
        total=sum(r.cost_usd for r in rows),
    )
