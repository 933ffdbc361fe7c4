"""D1 (`d1_databases`): Cloudflare's API and result shapes, `dockyard d1` commands, dev."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

D1_WORKER = """
import json

from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        db = self.env.DB
        path = request.path
        if path == "/quote":  # the shape of Cloudflare's D1 example
            results = await db.prepare("SELECT quote, author FROM qtable ORDER BY id LIMIT 1").all()
            data = results.results[0]
            return Response.json({"quote": data.quote, "author": data["author"]})
        if path == "/all":
            result = await db.prepare("SELECT id, author FROM qtable WHERE id > ?").bind(1).all()
            return Response.json({"results": result.results, "success": result.success,
                                  "meta_keys": sorted(result.meta),
                                  "rows_read": result.meta.rows_read})
        if path == "/first":
            stmt = db.prepare("SELECT id, author FROM qtable WHERE author = ?")
            return Response.json([await stmt.bind("Ada").first(),
                                  await stmt.bind("Ada").first("id"),
                                  await stmt.bind("Nobody").first()])
        if path == "/raw":
            stmt = db.prepare("SELECT id, author FROM qtable ORDER BY id")
            return Response.json([await stmt.raw(), await stmt.raw(columnNames=True)])
        if path == "/run":
            result = await db.prepare("INSERT INTO qtable (quote, author) VALUES (?, ?)").bind(
                "new", None).run()
            meta = result.meta
            return Response.json({"results": result.results, "success": result.success,
                                  "changes": meta.changes, "last_row_id": meta.last_row_id,
                                  "changed_db": meta.changed_db, "rows_written": meta.rows_written})
        if path == "/batch":
            results = await db.batch([
                db.prepare("INSERT INTO qtable (quote, author) VALUES (?, ?)").bind("b1", "B"),
                db.prepare("SELECT count(*) AS n FROM qtable"),
            ])
            return Response.json([r.results for r in results])
        if path == "/batch-fails":
            try:
                await db.batch([
                    db.prepare("INSERT INTO qtable (quote, author) VALUES ('lost', 'L')"),
                    db.prepare("INSERT INTO nowhere VALUES (1)"),
                ])
            except Exception as exc:
                kept = db.prepare("SELECT count(*) AS n FROM qtable WHERE author = 'L'")
                count = await kept.first("n")
                return Response(f"{exc} | kept {count}", status=500)
        if path == "/exec":
            script = "CREATE TABLE t (x);\\nINSERT INTO t VALUES (1);\\nINSERT INTO t VALUES (2)"
            result = await db.exec(script)
            return Response.json({"count": result.count, "has_duration": "duration" in result})
        if path == "/types":
            row = await db.prepare("SELECT ? AS i, ? AS f, ? AS s, ? AS n, ? AS b, ? AS t").bind(
                7, 1.5, "s", None, True, 2**40).first()
            return Response.json(row)
        return Response("?", status=404)
"""

D1_CONFIG = {
    "d1_databases": [
        {
            "binding": "DB",
            "database_name": "quotes",
            "database_id": "2b4ee4bc-1b8a-4c3c-8f0a-6cf5a7d6e0a1",
        }
    ]
}

SCHEMA = """
-- the schema, as `wrangler d1 execute --local --file` would run it
DROP TABLE IF EXISTS qtable;
CREATE TABLE qtable (id INTEGER PRIMARY KEY AUTOINCREMENT, quote TEXT, author TEXT);
INSERT INTO qtable (quote, author) VALUES ('Semicolons; inside strings', 'Ada');
INSERT INTO qtable (quote, author) VALUES ('Second', 'Grace');
"""


def dockyard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockyard", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.slow
async def test_d1_query_after_execute_file(tmp_path: Path) -> None:
    project = cf_project(tmp_path, D1_WORKER, D1_CONFIG, files={"schema.sql": SCHEMA})
    done = dockyard("d1", "execute", "quotes", "--local", "--file", "schema.sql", cwd=project)
    assert done.returncode == 0, done.stderr
    assert (project / ".dockyard" / "d1" / "quotes.sqlite").is_file()
    with DevServer(project) as server:
        url = server.url
        assert (await request(url + "/quote"))[:3] == (
            200,
            "application/json",
            b'{"quote": "Semicolons; inside strings", "author": "Ada"}',
        )
        _, _, body, _ = await request(url + "/all")
        assert json.loads(body) == {
            "results": [{"id": 2, "author": "Grace"}],
            "success": True,
            "meta_keys": [
                "changed_db",
                "changes",
                "duration",
                "last_row_id",
                "rows_read",
                "rows_written",
                "served_by",
                "served_by_primary",
                "served_by_region",
                "size_after",
                "timings",
            ],
            "rows_read": 1,
        }
        _, _, body, _ = await request(url + "/first")
        assert json.loads(body) == [{"id": 1, "author": "Ada"}, 1, None]
        _, _, body, _ = await request(url + "/raw")
        assert json.loads(body) == [
            [[1, "Ada"], [2, "Grace"]],
            [["id", "author"], [1, "Ada"], [2, "Grace"]],
        ]
        _, _, body, _ = await request(url + "/run")
        assert json.loads(body) == {
            "results": [],
            "success": True,
            "changes": 1,
            "last_row_id": 3,
            "changed_db": True,
            "rows_written": 1,
        }
        _, _, body, _ = await request(url + "/batch")
        assert json.loads(body) == [[], [{"n": 4}]]
        status, _, body, _ = await request(url + "/batch-fails")
        assert (status, body) == (
            500,
            b"D1_ERROR: no such table: nowhere: SQLITE_ERROR | kept 0",
        )
        assert json.loads((await request(url + "/exec"))[2]) == {"count": 3, "has_duration": True}
        _, _, body, _ = await request(url + "/types")
        assert json.loads(body) == {"i": 7, "f": 1.5, "s": "s", "n": None, "b": 1, "t": 2**40}
    # The CLI reads what the worker wrote, as JSON with Cloudflare's result shape.
    done = dockyard(
        "d1",
        "execute",
        "DB",
        "--command",
        "SELECT author FROM qtable ORDER BY id",
        "--json",
        cwd=project,
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["success"] is True
    assert result["results"] == [
        {"author": "Ada"},
        {"author": "Grace"},
        {"author": None},
        {"author": "B"},
    ]


async def test_d1_cli_errors_name_the_problem(tmp_path: Path) -> None:
    project = cf_project(tmp_path, D1_WORKER, D1_CONFIG)
    done = dockyard("d1", "execute", "nope", "--command", "SELECT 1", cwd=project)
    assert done.returncode == 2
    assert 'no D1 database named "nope" in d1_databases (known: quotes)' in done.stderr
    done = dockyard("d1", "execute", "quotes", "--command", "SELEC 1", cwd=project)
    assert done.returncode == 1
    assert 'D1_ERROR: near "SELEC": syntax error: SQLITE_ERROR' in done.stderr
    done = dockyard("d1", "execute", "quotes", "--remote", "--command", "SELECT 1", cwd=project)
    assert done.returncode == 1 and "Dockyard has no remote D1" in done.stderr


@pytest.mark.slow
def test_migrations_apply_in_order_once(tmp_path: Path) -> None:
    project = cf_project(
        tmp_path,
        D1_WORKER,
        D1_CONFIG,
        files={
            "migrations/0001_create.sql": "CREATE TABLE qtable (id INTEGER PRIMARY KEY, "
            "quote TEXT, author TEXT);\n",
            "migrations/0002_seed.sql": "INSERT INTO qtable (quote, author) VALUES ('m', 'M');\n",
        },
    )
    listed = dockyard("d1", "migrations", "list", "quotes", "--local", cwd=project)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["0001_create.sql", "0002_seed.sql"]
    applied = dockyard("d1", "migrations", "apply", "quotes", "--local", cwd=project)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["applied 0001_create.sql", "applied 0002_seed.sql"]
    again = dockyard("d1", "migrations", "apply", "quotes", "--local", cwd=project)
    assert again.stdout.strip() == "No migrations to apply."
    # A failing migration is rolled back whole and stops the run.
    (project / "migrations" / "0003_bad.sql").write_text(
        "INSERT INTO qtable (quote) VALUES ('half');\nINSERT INTO missing VALUES (1);\n"
    )
    failed = dockyard("d1", "migrations", "apply", "quotes", "--local", cwd=project)
    assert failed.returncode == 1
    assert "migration 0003_bad.sql failed: D1_ERROR: no such table: missing" in failed.stderr
    rows = dockyard(
        "d1", "execute", "quotes", "--command", "SELECT quote FROM qtable", "--json", cwd=project
    )
    assert json.loads(rows.stdout)[0]["results"] == [{"quote": "m"}]
