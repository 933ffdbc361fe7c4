"""The live parts, as Server-Sent Events. Each stream sends two kinds of event, both
JSON ``{"target": element id, "html": server-rendered, escaped HTML}``:

- ``replace``: the element's content is replaced (instance tables, rollout progress);
- ``append``: rows are added at the end (log lines).

Instance states are polled from the source every ``poll_interval`` and sent when the
rendered HTML changed; log lines come from ``source.tail`` through a bounded queue, so a
slow browser drops lines (and is told how many) instead of growing the node's memory.
A comment line every 15 s keeps idle connections alive and finds dead ones.

A log stream first catches up: the page says (``after``) the time of the newest line it
shows, and the stream sends what was stored since then before following the tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

from aiohttp import web

from dockyard.observe.dashboard.app import DASHBOARD, Dashboard
from dockyard.observe.dashboard.views import logs_query
from dockyard.observe.records import LogQuery, LogRecord

__all__ = ["app_stream", "instance_stream", "logs_stream"]

log = logging.getLogger(__name__)

KEEPALIVE = 15.0
QUEUE_LIMIT = 1000
BATCH = 200
CATCH_UP_LIMIT = 500

Fragments = Callable[[], Awaitable[dict[str, str]]]


def _event(kind: str, target: str, html: str) -> bytes:
    data = json.dumps({"target": target, "html": html}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def _pump(records: AsyncIterator[LogRecord], queue: asyncio.Queue[LogRecord | int]) -> None:
    """Copy a tail into `queue`; when it is full, count the lines dropped and put the
    count in once there is room again."""
    dropped = 0
    try:
        async for record in records:
            if dropped and not queue.full():
                queue.put_nowait(dropped)
                dropped = 0
            if queue.full():
                dropped += 1
            else:
                queue.put_nowait(record)
    except Exception:
        log.warning("Live log: the tail failed", exc_info=True)


async def _stream(
    request: web.Request,
    *,
    fragments: Fragments | None,
    tail: LogQuery | None,
    log_target: str,
    full_rows: bool,
) -> web.StreamResponse:
    dashboard: Dashboard = request.app[DASHBOARD]
    response = await _open(request)
    queue: asyncio.Queue[LogRecord | int] = asyncio.Queue(QUEUE_LIMIT)
    pump = asyncio.create_task(_pump(aiter(dashboard.source.tail(tail)), queue)) if tail else None
    closing = asyncio.create_task(dashboard.closing.wait())
    sent: dict[str, str] = {}
    last_write = time.monotonic()
    next_poll = 0.0
    try:
        seen: set[tuple[float, str, str]] = set()
        if tail is not None:
            # Let the pump subscribe before the catch-up query, so that a line lands in
            # the query, the tail, or both (and `seen` drops the second copy).
            await asyncio.sleep(0)
            missed = _catch_up(dashboard, request, tail)
            seen = {_key(r) for r in missed}
            if missed:
                await response.write(
                    _event("append", log_target, _rows(dashboard, missed, full_rows))
                )
        while not closing.done():
            now = time.monotonic()
            if fragments is not None and now >= next_poll:
                next_poll = now + dashboard.poll_interval
                for target, html in (await _poll(fragments, request)).items():
                    if sent.get(target) != html:
                        sent[target] = html
                        await response.write(_event("replace", target, html))
                        last_write = time.monotonic()
            if now - last_write >= KEEPALIVE:
                await response.write(b": keep-alive\n\n")
                last_write = now
            wait = min(
                next_poll - time.monotonic() if fragments else KEEPALIVE,
                last_write + KEEPALIVE - time.monotonic(),
            )
            got = await _next_batch(queue, max(wait, 0.0), closing)
            if seen:
                got = [r for r in got if not isinstance(r, LogRecord) or _key(r) not in seen]
            if got:
                await response.write(_event("append", log_target, _rows(dashboard, got, full_rows)))
                last_write = time.monotonic()
    except ConnectionResetError:
        pass  # the browser went away: nobody to tell
    finally:
        closing.cancel()
        if pump is not None:
            pump.cancel()
        await asyncio.gather(closing, *([pump] if pump else []), return_exceptions=True)
    return response


async def _poll(fragments: Fragments, request: web.Request) -> dict[str, str]:
    """The fragments, or none this time when the source failed: the page keeps what it
    shows and the next poll tries again (the response has started: no error page now)."""
    try:
        return await fragments()
    except Exception:
        log.warning("Live view %s: the source failed", request.path, exc_info=True)
        return {}


def _key(record: LogRecord) -> tuple[float, str, str]:
    return (record.time, record.container_id, record.message)


def _rows(dashboard: Dashboard, records: Sequence[LogRecord | int], full: bool) -> str:
    return dashboard.render_fragment("_log_rows.html", records=records, full=full, now=time.time())


def _catch_up(dashboard: Dashboard, request: web.Request, tail: LogQuery) -> list[LogRecord]:
    """The lines stored after the page was drawn (``after``: the time of the newest line it
    shows) and before this stream subscribed: without them a line printed while the page
    loads would be on neither."""
    try:
        after = float(request.query.get("after", ""))
    except ValueError:
        return []
    try:
        records = dashboard.source.logs(replace(tail, since=after, limit=CATCH_UP_LIMIT))
    except Exception:
        log.warning("Live log %s: catching up failed", request.path, exc_info=True)
        return []
    return [r for r in records if r.time > after]


async def _next_batch(
    queue: asyncio.Queue[LogRecord | int], wait: float, closing: asyncio.Task[bool]
) -> list[LogRecord | int]:
    """Whatever the queue holds (up to BATCH), waiting at most `wait` seconds for the first."""
    if queue.empty():
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait(
            {getter, closing}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
        if getter not in done:
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getter
            return []
        batch: list[LogRecord | int] = [getter.result()]
    else:
        batch = []
    while not queue.empty() and len(batch) < BATCH:
        batch.append(queue.get_nowait())
    return batch


async def app_stream(request: web.Request) -> web.StreamResponse:
    dashboard: Dashboard = request.app[DASHBOARD]
    app = request.match_info["app"]

    async def fragments() -> dict[str, str]:
        rows = await dashboard.source.instances(app)
        detail = await dashboard.source.app_detail(app)
        parts = {
            "instances-body": dashboard.render_fragment(
                "_instance_rows.html", app_name=app, rows=rows, now=time.time()
            )
        }
        if detail is not None:
            parts["rollout"] = dashboard.render_fragment("_rollout.html", app=detail)
        return parts

    return await _stream(request, fragments=fragments, tail=None, log_target="", full_rows=False)


async def instance_stream(request: web.Request) -> web.StreamResponse:
    dashboard: Dashboard = request.app[DASHBOARD]
    app, cid = request.match_info["app"], request.match_info["cid"]

    async def fragments() -> dict[str, str]:
        detail = await dashboard.source.instance(app, cid)
        if detail is None:
            return {}
        return {
            "instance-summary": dashboard.render_fragment(
                "_instance_summary.html", row=detail.row, now=time.time()
            )
        }

    return await _stream(
        request,
        fragments=fragments,
        tail=LogQuery(app=app, container_id=cid),
        log_target="log-body",
        full_rows=False,
    )


async def logs_stream(request: web.Request) -> web.StreamResponse:
    query, _ = logs_query(request.query)
    live = LogQuery(
        app=query.app,
        class_name=query.class_name,
        object_id=query.object_id,
        container_id=query.container_id,
        level=query.level,
        text=query.text,
    )
    return await _stream(request, fragments=None, tail=live, log_target="log-body", full_rows=True)
