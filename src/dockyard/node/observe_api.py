"""The observability routes of the admin listener: logs (history and live tail), usage and
``/metrics``. They sit behind the same bearer auth as the rest of ``/api/v1`` (and
``/metrics`` too: a scrape config gives Prometheus the token).

- ``GET /api/v1/logs``: records matching the query, oldest first (the newest ``limit``).
- ``GET /api/v1/logs/tail``: NDJSON, one record a line, live until the client leaves;
  ``backlog=N`` first sends the newest N matching records already stored. A blank line
  every ``KEEPALIVE`` seconds keeps idle connections open through proxies.
- ``GET /api/v1/usage``: metered use and its cost, grouped ``by`` app, class, object or day.
- ``GET /metrics``: Prometheus text, the node's series and every app process's.

Times (``since``, ``until``) are Unix seconds, ISO 8601, or a duration back from now
(``90s``, ``15m``, ``1h``, ``7d``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .._tasks import until_closed
from ..errors import DockyardError
from ..observe.metrics import CONTENT_TYPE
from ..observe.records import LEVELS, LogQuery, LogRecord
from .deploys import InvalidInput

if TYPE_CHECKING:
    from .node import Node

__all__ = ["KEEPALIVE", "add_observe_routes", "log_query", "parse_time"]

KEEPALIVE = 15.0
MAX_LIMIT = 10_000
_BY = ("app", "class", "object", "day")


def add_observe_routes(app: web.Application, node: Node, prefix: str) -> None:
    routes = _Routes(node)

    async def end_tails(_: web.Application) -> None:
        routes.closing.set()  # open tails end, so the listener closes without waiting

    app.on_shutdown.append(end_tails)
    app.add_routes(
        [
            web.get(f"{prefix}/logs", routes.logs),
            web.get(f"{prefix}/logs/tail", routes.tail),
            web.get(f"{prefix}/usage", routes.usage),
            web.get("/metrics", routes.metrics),
        ]
    )


class _Routes:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.closing = asyncio.Event()

    async def logs(self, request: web.Request) -> web.Response:
        query = log_query(request.query)
        await self.node.logs.flush()
        records = self.node.logs.query(query)
        return web.json_response({"records": [record.to_dict() for record in records]})

    async def tail(self, request: web.Request) -> web.StreamResponse:
        query = log_query(request.query)
        backlog = _int(request.query, "backlog", 0, 0, MAX_LIMIT)
        store = self.node.logs
        live = store.tail(query)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            # Subscribed before the backlog is read: nothing falls between the two. A
            # record in both (emitted after subscribing, stored before reading) goes once.
            seen: set[tuple[float, str, str]] = set()
            if backlog:
                await store.flush()
                for stored in store.query(dataclasses.replace(query, limit=backlog)):
                    seen.add((stored.time, stored.container_id, stored.message))
                    await response.write(_line(stored))
            async for record in until_closed(live, self.closing, idle=KEEPALIVE):
                if record is None:
                    await response.write(b"\n")
                    continue
                if seen and (record.time, record.container_id, record.message) in seen:
                    continue
                seen.clear()
                await response.write(_line(record))
        except ConnectionResetError:
            pass  # the client left: the tail just ends
        finally:
            aclose = getattr(live, "aclose", None)
            if aclose is not None:
                await aclose()
        return response

    async def usage(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "app")
        if by not in _BY:
            raise InvalidInput(
                f"by must be one of {', '.join(_BY)}, not {by!r}",
                [{"loc": ["query", "by"], "msg": f"one of {', '.join(_BY)}"}],
            )
        app = request.query.get("app") or None
        since = parse_time(request.query.get("since"), "since")
        until = parse_time(request.query.get("until"), "until")
        meter = self.node.usage
        rows = meter.usage(app=app, since=since, until=until, by=by)
        return web.json_response(
            {
                "by": by,
                "since": since,
                "until": until,
                "rows": [dataclasses.asdict(row) for row in rows],
                "total_usd": round(sum(row.cost_usd for row in rows), 8),
                "prices": dataclasses.asdict(meter.prices),  # what the costs were computed at
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.node.metrics_text()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def log_query(params: Any) -> LogQuery:
    """A LogQuery from query-string parameters, each bad one named in the error."""
    level = params.get("level") or None
    if level is not None and level not in LEVELS:
        raise InvalidInput(
            f"level must be one of {', '.join(LEVELS)}, not {level!r}",
            [{"loc": ["query", "level"], "msg": f"one of {', '.join(LEVELS)}"}],
        )
    return LogQuery(
        app=params.get("app") or None,
        since=parse_time(params.get("since"), "since"),
        until=parse_time(params.get("until"), "until"),
        source=params.get("source") or None,
        class_name=params.get("class") or None,
        object_id=params.get("object") or None,
        container_id=params.get("container") or None,
        level=level,
        text=params.get("grep") or None,
        limit=_int(params, "limit", 1000, 1, MAX_LIMIT),
    )


def parse_time(value: str | None, name: str, *, now: float | None = None) -> float | None:
    """Unix seconds from a number, an ISO 8601 time, or a duration back from now."""
    if not value:
        return None
    now = time.time() if now is None else now
    try:
        return float(value)
    except ValueError:
        pass
    from ..durations import parse_span

    try:
        return now - parse_span(value)
    except DockyardError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{name}: {value!r} is not a time (Unix seconds, ISO 8601, or a duration "
            "back from now such as 15m or 2h)",
            [{"loc": ["query", name], "msg": "a time"}],
        ) from None
    if moment.tzinfo is None:
        return moment.astimezone().timestamp()  # local time, as a user typed it
    return moment.timestamp()


def _int(params: Any, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidInput(
            f"{name} must be a whole number from {low} to {high}, not {raw!r}",
            [{"loc": ["query", name], "msg": f"{low}..{high}"}],
        )
    return value


def _line(record: LogRecord) -> bytes:
    return record.to_json().encode() + b"\n"
