"""The dashboard of a real ``dockyard serve`` in a real browser (Debian's Chromium, driven
by Playwright): log in, watch an instance start without reloading, see its output live,
stop it from the page, and read a cost. A screenshot of every page goes to the test's
output folder.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.node import Node, room_app, running_node

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture
def node() -> Iterator[Node]:
    with running_node() as running:
        yield running


def slow_start_project(tmp_path: Path) -> Path:
    """A container that takes 3 s to open its port (so "provisioning" is seen) and logs
    every request's URL on stdout."""
    return room_app(
        tmp_path,
        '["sh", "-c", "echo booting; sleep 3; exec httpd -f -vv -p 8080 -h /www 2>&1"]',
    )


def request_in_background(node: Node, host: str, path: str) -> threading.Thread:
    async def get() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(node.app_url + path, headers={"Host": host}) as response,
        ):
            await response.read()

    thread = threading.Thread(target=lambda: asyncio.run(get()), daemon=True)
    thread.start()
    return thread


def test_dashboard_in_a_browser(node: Node, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    root = slow_start_project(tmp_path)
    app = root.name
    host = f"{app}.localhost"
    node.deploy(str(root))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    ui = node.admin_url + "/ui"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(ui + "/")
            expect(page.locator("#token")).to_be_visible()  # sent to the login page
            page.screenshot(path=shots / "login.png", full_page=True)

            # A wrong token is refused and sets no session.
            page.fill("#token", "dy_wrong")
            page.click("button[type=submit]")
            expect(page.locator("#login-error")).to_be_visible()
            page.goto(ui + "/")
            expect(page.locator("#token")).to_be_visible()  # still not logged in

            page.fill("#token", node.token)
            page.click("button[type=submit]")
            expect(page.get_by_role("link", name=app)).to_be_visible()
            session = [c for c in page.context.cookies() if c["httpOnly"]]
            assert session, page.context.cookies()
            page.screenshot(path=shots / "overview.png", full_page=True)

            # The app page: an instance starts and its row changes without a reload.
            page.get_by_role("link", name=app).first.click()
            page.wait_for_url(f"**/ui/apps/{app}")
            page.wait_for_load_state("load")
            rows = page.locator("#instances-body")
            loads: list[str] = []
            page.on("load", lambda: loads.append(page.url))
            first = request_in_background(node, host, "/")
            expect(rows).to_contain_text("provisioning", timeout=15_000)
            page.screenshot(path=shots / "app-provisioning.png", full_page=True)
            expect(rows).to_contain_text(re.compile("healthy|running"), timeout=30_000)
            first.join(30)
            assert loads == [], f"the page reloaded: {loads}"
            page.screenshot(path=shots / "app.png", full_page=True)

            # The instance page: a line the container prints shows within 2 s.
            rows.locator("a").first.click()
            expect(page.locator("#log-body")).to_contain_text("booting", timeout=10_000)
            mark = f"/mark-{secrets.token_hex(4)}"
            request_in_background(node, host, mark).join(30)
            shown = time.monotonic()
            expect(page.locator("#log-body")).to_contain_text(f"url:{mark}", timeout=2_000)
            assert time.monotonic() - shown <= 2.5
            page.screenshot(path=shots / "instance.png", full_page=True)

            # Stop it from the page, with the confirmation step; it shows as stopped.
            page.get_by_role("link", name="Stop…").click()
            page.screenshot(path=shots / "confirm-stop.png", full_page=True)
            page.get_by_role("button", name="Yes, stop it").click()
            expect(page.locator("body")).to_contain_text("stopped", timeout=30_000)
            page.screenshot(path=shots / "instance-stopped.png", full_page=True)

            # The logs explorer and the usage page, which shows a cost.
            page.goto(f"{ui}/logs?app={app}")
            expect(page.locator("body")).to_contain_text("container.start", timeout=10_000)
            page.screenshot(path=shots / "logs.png", full_page=True)
            page.goto(f"{ui}/usage?app={app}&by=class")
            total = page.locator("#total-cost")
            expect(total).to_be_visible()
            cost = float(re.sub(r"[^0-9.]", "", total.inner_text()) or 0)
            assert cost > 0, total.inner_text()
            page.screenshot(path=shots / "usage.png", full_page=True)
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 9


def test_rotating_the_token_ends_dashboard_sessions(node: Node) -> None:
    async def scenario() -> tuple[str, str, str]:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            async with browser.get(node.admin_url + "/ui/login") as response:
                form = await response.text()
            match = re.search(r'name="csrf" value="([^"]+)"', form)
            assert match, form
            login = {"csrf": match.group(1), "token": node.token, "next": ""}
            async with browser.post(node.admin_url + "/ui/login", data=login) as response:
                assert response.status == 200, await response.text()
            async with browser.get(node.admin_url + "/ui/") as response:
                before = str(response.url)
            status, _ = await node._api("POST", "/tokens/rotate", None)
            assert status == 200
            async with browser.get(node.admin_url + "/ui/") as response:
                after = str(response.url)
            return before, after, form

    before, after, _ = asyncio.run(scenario())
    assert "/login" not in before
    assert "/login" in after
