"""Cron triggers (`triggers.crons`): the parser, config errors and firing in `dockyard dev`."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from dockyard.bindings.cron import CronError, parse_cron
from tests.support.compat import cf_project
from tests.support.devserver import DevServer

NOV_28 = dt.datetime(2026, 11, 28, 3, 20, 30, tzinfo=dt.UTC)  # a Saturday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("*/5 * * * *", dt.datetime(2026, 11, 28, 3, 25)),
        ("20 3 * * *", dt.datetime(2026, 11, 29, 3, 20)),  # strictly after: not 03:20 today
        ("0 9 * * MON-FRI", dt.datetime(2026, 11, 30, 9, 0)),
        ("0 12 * * 1", dt.datetime(2026, 11, 29, 12, 0)),  # 1 is Sunday, as on Cloudflare
        ("0 12 * * 7", dt.datetime(2026, 11, 28, 12, 0)),  # 7 is Saturday
        ("0 0 L * *", dt.datetime(2026, 11, 30, 0, 0)),
        ("0 10 * * MON#2", dt.datetime(2026, 12, 14, 10, 0)),
        ("0 8 * * 6L", dt.datetime(2026, 12, 25, 8, 0)),  # the last Friday
        ("0 0 15W * *", dt.datetime(2026, 12, 15, 0, 0)),
        ("0 0 1W * *", dt.datetime(2026, 12, 1, 0, 0)),
        ("0 0 LW * *", dt.datetime(2026, 11, 30, 0, 0)),
        ("30 2 1 JAN,jul *", dt.datetime(2027, 1, 1, 2, 30)),
        ("0 0 29 2 *", dt.datetime(2028, 2, 29, 0, 0)),
        ("0 0 13 * FRI", dt.datetime(2026, 12, 4, 0, 0)),  # either day field matches
    ],
)
def test_next_run(expression: str, expected: dt.datetime) -> None:
    assert parse_cron(expression).next_after(NOV_28) == expected.replace(tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("* * * * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 6"),
        ("61 * * * *", "minute: 61 is out of range 0-59"),
        ("0 0 * * 0", "day of week: 0 is out of range 1-7"),
        ("0 0 30 2 *", "it never fires (no such date)"),
        ("*/0 * * * *", "minute: step '0' must be a positive number"),
        ("0 5-1 * * *", "hour: range '5-1' runs backwards"),
        ("0 0 * * MON#6", "day of week: 'MON#6': the number after # must be 1-5"),
    ],
)
def test_bad_expressions(expression: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse_cron(expression)
    assert str(caught.value) == message


async def test_bad_cron_is_a_config_error_with_file_and_line(tmp_path: Path) -> None:
    project = cf_project(tmp_path, "async def fetch(request, env, ctx): pass\n")
    (project / "wrangler.jsonc").write_text(
        '{\n  "name": "cf-probe",\n  "main": "src/entry.py",\n  "triggers": {\n'
        '    "crons": ["*/5 * * * *",\n              "0 25 * * *"]\n  }\n}\n'
    )
    server = DevServer(project)
    with pytest.raises(AssertionError):
        server.start(timeout=30)
    assert server.stop() == 2
    assert (
        "wrangler.jsonc:6: triggers.crons[1]: invalid cron expression '0 25 * * *': hour: 25 "
        "is out of range 0-23"
    ) in server.output.replace("\n", "")


CRON_WORKER = """
import json
import time

from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response("ok")

    async def scheduled(self, controller, env, ctx):
        print("SCHEDULED " + json.dumps({
            "cron": controller.cron, "scheduledTime": controller.scheduledTime,
            "ran_at": time.time() * 1000, "greeting": env.GREETING,
            "same_env": env is self.env,
        }), flush=True)
"""


@pytest.mark.slow
async def test_scheduled_handler_fires_within_a_second_of_its_minute(tmp_path: Path) -> None:
    project = cf_project(
        tmp_path,
        CRON_WORKER,
        {"triggers": {"crons": ["* * * * *", "0 0 1 1 *"]}, "vars": {"GREETING": "hi"}},
    )
    with DevServer(project) as server:
        started = time.time()
        match = server.wait_for(r"SCHEDULED (\{.*\})", timeout=75)
        run = json.loads(match.group(1))
    assert run["cron"] == "* * * * *"
    assert run["greeting"] == "hi" and run["same_env"] is True
    scheduled = run["scheduledTime"] / 1000
    # On a minute boundary, the first one after dev started, and run within 1 s of it.
    assert scheduled % 60 == 0
    assert started < scheduled <= started + 60
    assert 0 <= run["ran_at"] / 1000 - scheduled < 1.0
