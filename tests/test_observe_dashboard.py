"""The dashboard (observe/dashboard/) on a real aiohttp server on 127.0.0.1, fed by a small
in-memory DashboardSource. HTTP-level tests check the session and CSRF rules byte by byte;
browser tests drive Debian's chromium through Playwright (no browser download) and write a
screenshot of every page under the test's tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from yarl import URL

from dockyard.observe.dashboard import (
    AppDetail,
    AppSummary,
    ClassSummary,
    InstanceDetail,
    InstanceRow,
    RolloutProgress,
    VersionSummary,
    make_dashboard,
)
from dockyard.observe.dashboard.charts import bar_chart, line_chart
from dockyard.observe.dashboard.sessions import Sessions
from dockyard.observe.records import LogQuery, LogRecord, UsageRow
from tests.support.certs import self_signed

TOKEN = "dk_admin_5f1e0c2a9b7d4e3f"
CHROMIUM = Path("/usr/bin/chromium")
C1 = "a1b2c3d4e5f6" + "1" * 52  # healthy
C2 = "b2c3d4e5f6a1" + "2" * 52  # provisioning
C3 = "c3d4e5f6a1b2" + "3" * 52  # stopped


class MemorySource:
    """A DashboardSource in memory whose instances and logs change when the test says so."""

    def __init__(self) -> None:
        now = time.time()
        self.now = now
        self.rows: dict[str, InstanceRow] = {}
        self.add_row(C1, "Api", "cart-7", "healthy", started=now - 312, cpu=0.124, mem=83 << 20)
        self.add_row(C2, "Api", "cart-9", "provisioning", started=None, cpu=None, mem=None)
        self.add_row(C3, "Worker", "thumbs", "stopped", started=now - 900, exit_code=137)
        self.records: list[LogRecord] = [
            LogRecord(
                app="shop",
                message=f"GET /cart/{i} 200",
                source="container",
                container_id=C1,
                class_name="Api",
                object_name="cart-7",
                time=now - 60 + i,
                level="warning" if i == 3 else "info",
            )
            for i in range(8)
        ]
        self.records.append(
            LogRecord(
                app="shop",
                message="<script>alert(1)</script> escaped?",
                source="worker",
                time=now - 5,
                level="error",
            )
        )
        self.records.append(
            LogRecord(
                app="shop",
                message="started in 412 ms",
                source="platform",
                stream="event",
                event="container.start",
                container_id=C1,
                time=now - 300,
            )
        )
        self.subscribers: list[tuple[LogQuery, asyncio.Queue[LogRecord]]] = []
        self.subscribed = asyncio.Event()
        self.stops: list[tuple[str, str, bool]] = []
        self.failure: Exception | None = None
        self.failed = asyncio.Event()  # set when instances() raised `failure`

    def add_row(
        self,
        cid: str,
        cls: str,
        name: str,
        state: Any,
        *,
        started: float | None,
        cpu: float | None = None,
        mem: int | None = None,
        exit_code: int | None = None,
    ) -> None:
        self.rows[cid] = InstanceRow(
            app="shop",
            class_name=cls,
            object_id=hmac.new(b"k", name.encode(), "sha256").hexdigest(),
            object_name=name,
            container_id=cid,
            state=state,
            exit_code=exit_code,
            started_at=started,
            cpu_fraction=cpu,
            memory_bytes=mem,
        )

    def set_state(self, cid: str, state: Any, **changes: Any) -> None:
        self.rows[cid] = replace(self.rows[cid], state=state, **changes)

    def emit(self, record: LogRecord) -> None:
        self.records.append(record)
        for query, queue in self.subscribers:
            if query.matches(record):
                queue.put_nowait(record)

    # -- the DashboardSource protocol --

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), TOKEN.encode())

    async def overview(self) -> list[AppSummary]:
        if self.failure is not None:
            raise self.failure
        live = sum(1 for r in self.rows.values() if r.state != "stopped")
        return [
            AppSummary("shop", 3, 412.5, 0.012, live, 0.0418),
            AppSummary("blog", 1, 18.0, 0.0, 0, 0.0031),
        ]

    async def app_detail(self, app: str) -> AppDetail | None:
        if app == "blog":
            return AppDetail("blog", 1, [VersionSummary(1, self.now - 86400, True, [])])
        if app != "shop":
            return None
        return AppDetail(
            name="shop",
            active_version=3,
            versions=[
                VersionSummary(
                    n, self.now - (4 - n) * 3600, n == 3, [f"127.0.0.1:5000/shop/api:v{n}"]
                )
                for n in (1, 2, 3)
            ],
            rollout=RolloutProgress(version=3, status="in_progress", replaced=2, total=4),
            classes=[ClassSummary("Api", "lite", 5, 2), ClassSummary("Worker", "standard", 3, 0)],
        )

    async def instances(self, app: str) -> list[InstanceRow]:
        if self.failure is not None:
            self.failed.set()
            raise self.failure
        return [r for r in self.rows.values() if r.app == app]

    async def instance(self, app: str, container_id: str) -> InstanceDetail | None:
        row = self.rows.get(container_id)
        if row is None or row.app != app:
            return None
        samples = [
            (self.now - 600 + 10 * i, 0.05 + 0.1 * (i % 7) / 7, (60 + i % 13) << 20)
            for i in range(60)
        ]
        return InstanceDetail(row, samples)

    async def stop_instance(self, app: str, container_id: str, *, destroy: bool) -> None:
        if container_id not in self.rows:
            raise LookupError(container_id)
        self.stops.append((app, container_id, destroy))
        if destroy:
            del self.rows[container_id]
        else:
            self.set_state(container_id, "stopping")  # like a node: the stop takes a while

    def logs(self, query: LogQuery) -> list[LogRecord]:
        found = sorted((r for r in self.records if query.matches(r)), key=lambda r: r.time)
        return found[-query.limit :]

    async def tail(self, query: LogQuery) -> AsyncIterator[LogRecord]:
        queue: asyncio.Queue[LogRecord] = asyncio.Queue()
        entry = (query, queue)
        self.subscribers.append(entry)
        self.subscribed.set()
        try:
            while True:
                yield await queue.get()
        finally:
            self.subscribers.remove(entry)

    def usage(self, *, app: str | None, since: float | None, by: str) -> list[UsageRow]:
        keys = {
            "app": ["shop", "blog"],
            "class": ["shop/Api", "shop/Worker"],
            "day": ["2026-11-26", "2026-11-27", "2026-11-28"],
        }.get(by, ["shop"])
        return [
            UsageRow(
                key=k,
                runs=3 + i,
                running_seconds=3600.0 * (i + 1),
                paused_seconds=120.0,
                vcpu_seconds=410.5 * (i + 1),
                memory_gib_seconds=900.0 * (i + 1),
                disk_gb_seconds=7200.0,
                egress_bytes=5 << 20,
                cost_usd=0.0104 * (i + 1),
            )
            for i, k in enumerate(keys)
        ]


@dataclass
class Served:
    source: MemorySource
    base: str  # http://127.0.0.1:PORT/ui


@contextlib.asynccontextmanager
async def _serving(
    dashboard: web.Application, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """`dashboard` mounted at /ui on a real server on 127.0.0.1; yields its base URL."""
    root = web.Application()
    root.add_subapp("/ui", dashboard)
    runner = web.AppRunner(root, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        yield f"{scheme}://{host}:{port}/ui"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    source = MemorySource()
    async with _serving(make_dashboard(source, prefix="/ui", poll_interval=0.1)) as base:
        yield Served(source, base)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


async def _logged_in(http: aiohttp.ClientSession, base: str) -> str:
    """Logs `http` in; returns the session's CSRF token."""
    async with http.get(f"{base}/login") as resp:
        csrf = _csrf(await resp.text())
    async with http.post(
        f"{base}/login", data={"csrf": csrf, "token": TOKEN}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    async with http.get(f"{base}/") as resp:
        assert resp.status == 200
        return _csrf(await resp.text())


def _client() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for an IP address host (127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


# -- HTTP level ------------------------------------------------------------------------------


async def test_wrong_token_is_refused_and_right_one_sets_httponly_strict_cookie(
    served: Served,
) -> None:
    async with _client() as http:
        async with http.get(f"{served.base}/", allow_redirects=False) as resp:
            assert resp.status == 303
            location = URL(resp.headers["Location"])
            assert location.path == "/ui/login" and location.query["next"] == "/ui/"
        async with http.get(f"{served.base}/login") as resp:
            csrf = _csrf(await resp.text())
            anonymous = resp.cookies["dockyard_session"].value
        async with http.post(
            f"{served.base}/login", data={"csrf": csrf, "token": "nope"}, allow_redirects=False
        ) as resp:
            assert resp.status == 401
            assert "That token was not accepted" in await resp.text()
        async with http.get(f"{served.base}/", allow_redirects=False) as resp:
            assert resp.status == 303  # still not logged in
        async with http.post(
            f"{served.base}/login", data={"csrf": csrf, "token": TOKEN}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/ui/"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=Strict" in cookie
            assert "Path=/ui" in cookie
            assert "Secure" not in cookie  # plain HTTP here; TLS requests get Secure
            assert resp.cookies["dockyard_session"].value != anonymous  # no fixation
        async with http.get(f"{served.base}/") as resp:
            assert resp.status == 200
            page = await resp.text()
            assert ">shop</a>" in page and ">blog</a>" in page
        async with http.get(f"{served.base}/login") as resp:
            assert str(resp.url) == f"{served.base}/"  # logged in: the form is skipped
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed(tmp_path))
    return context


async def test_session_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    dashboard = make_dashboard(MemorySource())
    async with _serving(dashboard, ssl_context=_self_signed(tmp_path)) as base, _client() as http:
        async with http.get(f"{base}/login", ssl=False) as resp:
            assert resp.status == 200
            cookie = resp.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie


async def test_post_without_or_with_wrong_csrf_is_403(served: Served) -> None:
    stop_url = f"{served.base}/apps/shop/instances/{C1}/stop"
    async with _client() as http:
        # Before login: the login form itself needs the token.
        async with http.get(f"{served.base}/login"):
            pass
        async with http.post(
            f"{served.base}/login", data={"token": TOKEN}, allow_redirects=False
        ) as resp:
            assert resp.status == 403
        csrf = await _logged_in(http, served.base)
        async with http.post(stop_url, data={"destroy": "0"}, allow_redirects=False) as resp:
            assert resp.status == 403
            assert "did not come from this dashboard" in await resp.text()
        async with http.post(
            stop_url, data={"csrf": csrf[:-1] + "x", "destroy": "0"}, allow_redirects=False
        ) as resp:
            assert resp.status == 403
        async with http.post(f"{served.base}/logout", allow_redirects=False) as resp:
            assert resp.status == 403
        assert served.source.stops == []
        async with http.post(
            stop_url, data={"csrf": csrf, "destroy": "0"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        assert served.source.stops == [("shop", C1, False)]
        async with http.post(
            f"{served.base}/logout", data={"csrf": csrf}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        async with http.get(f"{served.base}/", allow_redirects=False) as resp:
            assert resp.status == 303  # the session ended with the logout


async def test_login_only_returns_to_pages_of_the_dashboard(served: Served) -> None:
    for target, expected in (
        ("https://evil.example/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/ui/apps/shop?x=1", "/ui/apps/shop?x=1"),
        ("/uix", "/ui/"),
    ):
        async with _client() as http:
            async with http.get(f"{served.base}/login") as resp:
                csrf = _csrf(await resp.text())
            form = {"csrf": csrf, "token": TOKEN, "next": target}
            async with http.post(f"{served.base}/login", data=form, allow_redirects=False) as resp:
                assert resp.headers["Location"] == expected, target


async def test_logout_everyone_ends_sessions() -> None:
    from dockyard.observe.dashboard import logout_everyone

    dashboard = make_dashboard(MemorySource())
    async with _serving(dashboard) as base, _client() as http:
        await _logged_in(http, base)
        logout_everyone(dashboard)
        async with http.get(f"{base}/", allow_redirects=False) as resp:
            assert resp.status == 303


class EmptySource(MemorySource):
    """A node with nothing deployed yet."""

    def __init__(self) -> None:
        super().__init__()
        self.rows.clear()
        self.records.clear()

    async def overview(self) -> list[AppSummary]:
        return []

    def usage(self, *, app: str | None, since: float | None, by: str) -> list[UsageRow]:
        return []


async def test_empty_node_pages_say_so() -> None:
    async with _serving(make_dashboard(EmptySource())) as base, _client() as http:
        await _logged_in(http, base)
        for path, text in (
            ("/", "No apps yet"),
            ("/apps/shop", "No instances right now"),
            ("/logs", "No log lines match"),
            ("/usage", "No usage in this period"),
        ):
            async with http.get(base + path) as resp:
                assert resp.status == 200, path
                assert text in await resp.text(), path


async def test_no_session_means_no_stream_and_no_post(served: Served) -> None:
    async with _client() as http:
        async with http.get(f"{served.base}/apps/shop/live") as resp:
            assert resp.status == 401
        async with http.post(
            f"{served.base}/apps/shop/instances/{C1}/stop",
            data={"csrf": "x"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 403
    assert served.source.stops == []


async def test_everything_is_escaped_and_errors_hide_internals(served: Served) -> None:
    async with _client() as http:
        await _logged_in(http, served.base)
        async with http.get(f"{served.base}/logs", params={"app": "shop"}) as resp:
            page = await resp.text()
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "<script>alert" not in page
        async with http.get(f"{served.base}/apps/nope") as resp:
            assert resp.status == 404
            assert "Not found" in await resp.text()
        async with http.get(f"{served.base}/apps/shop/instances/{'0' * 64}") as resp:
            assert resp.status == 404
        served.source.failure = RuntimeError("db at /var/lib/dockyard/secret.db is locked")
        async with http.get(f"{served.base}/") as resp:
            assert resp.status == 500
            page = await resp.text()
            assert "/var/lib" not in page and "RuntimeError" not in page
            assert re.search(r"reference: <code>[0-9a-f]{8}</code>", page)


async def test_live_instance_stream_sends_state_changes(served: Served) -> None:
    async with _client() as http:
        await _logged_in(http, served.base)
        async with http.get(f"{served.base}/apps/shop/live") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await _read_event(resp, "instances-body")
            assert "state-provisioning" in first
            served.source.set_state(C2, "running", started_at=time.time())
            while "state-provisioning" in (html := await _read_event(resp, "instances-body")):
                pass
            assert html.count("state-running") == 1


async def test_live_stream_survives_a_failing_source(served: Served) -> None:
    async with _client() as http:
        await _logged_in(http, served.base)
        async with http.get(f"{served.base}/apps/shop/live") as resp:
            assert "state-provisioning" in await _read_event(resp, "instances-body")
            served.source.failure = RuntimeError("engine unavailable")
            served.source.set_state(C2, "running")
            await asyncio.wait_for(served.source.failed.wait(), 5.0)
            served.source.failure = None
            assert "state-provisioning" not in await _read_event(resp, "instances-body")


async def test_live_log_catches_up_on_lines_stored_before_it_connected(served: Served) -> None:
    shown = max(r.time for r in served.source.records if r.container_id == C1)
    # Stored after the page was drawn but before its stream subscribed:
    served.source.emit(
        LogRecord(
            app="shop", message="printed while the page loaded", container_id=C1, time=shown + 0.5
        )
    )
    async with _client() as http:
        await _logged_in(http, served.base)
        url = f"{served.base}/apps/shop/instances/{C1}/live"
        async with http.get(url, params={"after": repr(shown)}) as resp:
            first = await _read_event(resp, "log-body")
            assert "printed while the page loaded" in first
            assert "GET /cart/" not in first  # already on the page
            await asyncio.wait_for(served.source.subscribed.wait(), 5.0)
            served.source.emit(
                LogRecord(app="shop", message="then live", container_id=C1, time=shown + 1)
            )
            second = await _read_event(resp, "log-body")
            assert "then live" in second and "printed while" not in second


async def _read_event(resp: aiohttp.ClientResponse, target: str) -> str:
    """The HTML of the next SSE event for `target` (within 5 s)."""
    import json

    async def read() -> str:
        data = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                message = json.loads(data)
                data = ""
                if message["target"] == target:
                    return str(message["html"])
        raise AssertionError("stream ended")

    return await asyncio.wait_for(read(), 5.0)


def test_sessions_expire_and_stay_bounded() -> None:
    now = [1000.0]
    sessions = Sessions(lifetime=60, anonymous_lifetime=10, limit=3, clock=lambda: now[0])
    user = sessions.create(authenticated=True)
    guest = sessions.create(authenticated=False)
    now[0] += 11
    assert sessions.get(guest.id) is None
    assert sessions.get(user.id) is user
    for _ in range(5):
        sessions.create(authenticated=False)
    assert len(sessions) == 4  # 3 anonymous, and the anonymous flood left the user alone
    assert sessions.get(user.id) is user
    others = [sessions.create(authenticated=True) for _ in range(3)]
    assert sessions.get(user.id) is None  # the oldest logged-in one made room
    assert all(sessions.get(s.id) is s for s in others)
    now[0] += 61
    assert sessions.get(others[0].id) is None
    assert not user.csrf_matches(None) and user.csrf_matches(user.csrf)


def test_charts_escape_labels_and_handle_empty_input() -> None:
    svg = bar_chart([("<b>x</b>", 2.0), ("y", 1.0)], chart_id="c", title="t&t", fmt=str)
    assert "&lt;b&gt;x&lt;/b&gt;" in svg and "<b>" not in svg
    assert 'width="400"' in svg and 'width="200"' in svg  # bars scale to the largest
    assert "Nothing to show" in bar_chart([], chart_id="e", title="t", fmt=str)
    line = line_chart([(0.0, 0.5), (10.0, 1.0)], chart_id="l", title="cpu", fmt=str)
    assert "<polyline" in line and "latest 1.0, peak 1.0" in line
    assert "Not enough samples" in line_chart([(0.0, 1.0)], chart_id="o", title="o", fmt=str)


# -- in a real browser -------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not installed"
)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api", reason="needs playwright (dev extra)")
    async_playwright = playwright.async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def _browser_login(browser: Any, served: Served) -> tuple[Any, Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{served.base}/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{served.base}/")
    return context, page


@pytest.mark.slow
@needs_chromium
async def test_browser_login_and_every_page(browser: Any, served: Served, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{served.base}/apps/shop")
    assert page.url.startswith(f"{served.base}/login")
    await page.get_by_label("Admin token").fill("wrong-token")
    await page.keyboard.press("Enter")
    assert "not accepted" in await page.get_by_role("alert").inner_text()
    await page.screenshot(path=shots / "login-refused.png", full_page=True)
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{served.base}/apps/shop")  # back where it was going
    cookie = next(c for c in await context.cookies() if c["name"] == "dockyard_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    pages = {
        "overview": ("/", "Overview"),
        "app": ("/apps/shop", "shop"),
        "instance": (f"/apps/shop/instances/{C1}", "Instance"),
        "confirm-stop": (f"/apps/shop/instances/{C1}/stop", "Stop instance"),
        "confirm-destroy": (f"/apps/shop/instances/{C1}/stop?destroy=1", "Destroy instance"),
        "logs": ("/logs?app=shop", "Logs"),
        "usage": ("/usage", "Usage and cost"),
        "usage-by-day": ("/usage?by=day", "Usage and cost"),
    }
    for name, (path, heading) in pages.items():
        response = await page.goto(served.base + path)
        assert response is not None and response.status == 200, name
        assert heading in await page.locator("h1").inner_text(), name
        await page.screenshot(path=shots / f"{name}.png", full_page=True)
    await page.goto(f"{served.base}/usage")
    total = await page.locator("#total-cost").inner_text()
    assert float(total.lstrip("$").replace(",", "")) > 0
    assert await page.locator("svg.chart-bar rect").count() == 2
    assert len(list(shots.glob("*.png"))) == len(pages) + 1


@pytest.mark.slow
@needs_chromium
async def test_browser_instance_row_goes_live_from_provisioning_to_running(
    browser: Any, served: Served
) -> None:
    _, page = await _browser_login(browser, served)
    await page.goto(f"{served.base}/apps/shop")
    await page.wait_for_selector("[data-live-state=open]", timeout=5000)
    await page.evaluate("window.notReloaded = true")
    row = page.locator(f"tr[data-container='{C2}']")
    assert await row.locator(".state").inner_text() == "provisioning"
    await page.locator(f"tr[data-container='{C1}'] a").focus()  # a keyboard user is here
    served.source.set_state(C2, "running", started_at=time.time(), cpu_fraction=0.02)
    await row.locator(".state-running").wait_for(timeout=2000)
    assert await row.locator(".state").inner_text() == "running"
    assert await page.evaluate("window.notReloaded") is True
    focused = await page.evaluate("document.activeElement.closest('tr').dataset.container")
    assert focused == C1  # the update kept the focus where it was


@pytest.mark.slow
@needs_chromium
async def test_browser_live_log_line_within_two_seconds(browser: Any, served: Served) -> None:
    _, page = await _browser_login(browser, served)
    await page.goto(f"{served.base}/apps/shop/instances/{C1}")
    await asyncio.wait_for(served.source.subscribed.wait(), 5.0)
    served.source.emit(
        LogRecord(
            app="shop",
            message="hello from the container <3",
            source="container",
            container_id=C1,
            class_name="Api",
        )
    )
    await (
        page.locator("#log-body").get_by_text("hello from the container <3").wait_for(timeout=2000)
    )


@pytest.mark.slow
@needs_chromium
async def test_browser_logs_explorer_filters_and_live_tail_toggle(
    browser: Any, served: Served
) -> None:
    _, page = await _browser_login(browser, served)
    await page.goto(f"{served.base}/logs")
    await page.get_by_label("Level at least").select_option("warning")
    await page.get_by_role("button", name="Apply filters").click()
    await page.wait_for_url(re.compile(r".*level=warning.*"))
    body = page.locator("#log-body")
    assert "GET /cart/3 200" in await body.inner_text()  # the one warning
    assert "GET /cart/2 200" not in await body.inner_text()  # info: filtered out
    assert served.source.subscribers == []  # live tail is off until asked for
    await page.get_by_label("Live tail").check()
    await asyncio.wait_for(served.source.subscribed.wait(), 5.0)
    served.source.emit(LogRecord(app="shop", message="quiet line", level="info"))
    served.source.emit(LogRecord(app="shop", message="disk nearly full", level="error"))
    await body.get_by_text("disk nearly full").wait_for(timeout=2000)
    assert "quiet line" not in await body.inner_text()  # the tail keeps the filter
    await page.get_by_label("Live tail").uncheck()
    assert await page.locator("#live-status").inner_text() == "Live tail off"


@pytest.mark.slow
@needs_chromium
async def test_browser_stop_with_confirmation_calls_source(browser: Any, served: Served) -> None:
    _, page = await _browser_login(browser, served)
    await page.goto(f"{served.base}/apps/shop/instances/{C1}")
    await page.get_by_role("link", name="Stop…").click()
    assert "Stop instance" in await page.locator("h1").inner_text()
    assert served.source.stops == []  # the first click only asks
    await page.get_by_role("button", name="Yes, stop it").click()
    await page.wait_for_url(re.compile(r".*done=stopped$"))
    assert served.source.stops == [("shop", C1, False)]
    assert await page.locator("#instance-summary .state").inner_text() == "stopping"
    await page.wait_for_selector("[data-live-state=open]", timeout=5000)
    served.source.set_state(C1, "stopped", exit_code=0)
    await page.locator("#instance-summary .state-stopped").wait_for(timeout=2000)
    assert await page.locator("#instance-summary .state").inner_text() == "stopped (exit 0)"


@pytest.mark.slow
@needs_chromium
async def test_browser_without_javascript_reads_and_destroys_by_keyboard(
    browser: Any, served: Served
) -> None:
    context = await browser.new_context(java_script_enabled=False)
    page = await context.new_page()
    await page.goto(f"{served.base}/login")
    await page.get_by_label("Admin token").fill(TOKEN)  # focused on load (autofocus)
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{served.base}/")
    await page.keyboard.press("Tab")  # the first stop is the skip link
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.get_by_role("link", name="shop").click()
    assert await page.locator(f"tr[data-container='{C2}'] .state").inner_text() == "provisioning"
    await page.goto(f"{served.base}/apps/shop/instances/{C3}")
    assert "GET /cart" not in await page.locator("#log-body").inner_text()
    assert await page.locator("svg.chart-line polyline").count() == 2
    destroy = page.get_by_role("link", name="Destroy…")
    await destroy.focus()
    await page.keyboard.press("Enter")
    confirm = page.get_by_role("button", name="Yes, destroy it")
    await confirm.focus()
    await page.keyboard.press("Enter")
    await page.wait_for_url(re.compile(r".*/apps/shop\?done=destroyed$"))
    assert served.source.stops == [("shop", C3, True)]
    assert "destroyed" in await page.get_by_role("status").inner_text()
    assert await page.locator(f"tr[data-container='{C3}']").count() == 0
