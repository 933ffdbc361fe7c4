"""Class migrations applied to stored objects: renames keep data and ids, deletions need a
confirmation, each tag runs once, a rename without a migration is a config error, and an
apply that fails or is SIGKILLed midway leaves the old state (real SQLite files, real
processes)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dockyard.app import App
from dockyard.config import load_config
from dockyard.errors import ConfigError
from dockyard.settings import ObjectSettings, Settings
from tests.support.devserver import DevServer

FETCH = """
from dockyard import DurableObject, Response


async def fetch(request, env, ctx):
    return Response("ok")
"""

CLASS = """
class {name}(DurableObject):
    async def add(self, n):
        value = (await self.ctx.storage.get("n") or 0) + n
        await self.ctx.storage.put("n", value)
        return value

    async def value(self):
        return await self.ctx.storage.get("n") or 0

    async def set_alarm_at(self, when):
        await self.ctx.storage.set_alarm(when)

    async def alarm_at(self):
        return await self.ctx.storage.get_alarm()

    async def alarm(self, info):
        pass

    # Dockyard's own per-object state (a container's state and schedules live there).
    def mark(self, value):
        self.ctx.storage.internal.put("mark", value)

    def marked(self):
        return self.ctx.storage.internal.get("mark")
"""


def project(
    root: Path,
    *,
    bind: dict[str, str],
    migrations: list[dict[str, Any]],
    define: tuple[str, ...] = (),
) -> Path:
    """A project binding ``bind`` (binding -> class) and defining those classes (and
    ``define``), with the given migrations; rewritten in place for the next version."""
    root.mkdir(parents=True, exist_ok=True)
    classes = sorted({*bind.values(), *define})
    source = FETCH + "".join(CLASS.format(name=name) for name in classes)
    (root / "worker.py").write_text(source)
    config = {
        "name": "migrating",
        "main": "worker.py",
        "durable_objects": {"bindings": [{"name": b, "class_name": c} for b, c in bind.items()]},
        "migrations": migrations,
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config, indent=2))
    return root


def make_app(root: Path, *, apply_deletions: bool = False) -> App:
    objects = ObjectSettings(apply_deletions=True) if apply_deletions else ObjectSettings()
    settings = Settings(state_dir=root / ".dockyard", objects=objects)
    return App(root, settings=settings)


async def call(app: App, binding: str, name: str, method: str, *args: Any) -> Any:
    namespace = getattr(app.env, binding)
    return await getattr(namespace.get(namespace.id_from_name(name)), method)(*args)


V1 = {"tag": "v1", "new_sqlite_classes": ["Counter"]}
RENAME = {"tag": "v2", "renamed_classes": [{"from": "Counter", "to": "Tally"}]}


async def test_rename_moves_objects_alarms_and_keeps_their_ids(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1])
    due = (time.time() + 3600) * 1000
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "add", 3) == 3
        assert await call(app, "COUNTER", "y", "add", 7) == 7
        await call(app, "COUNTER", "x", "set_alarm_at", due)
        await call(app, "COUNTER", "x", "mark", "running")
        old_id = str(app.env.COUNTER.id_from_name("x"))

    project(root, bind={"COUNTER": "Tally"}, migrations=[V1, RENAME])
    async with make_app(root) as app:
        namespace = app.env.COUNTER
        assert namespace.class_name == "Tally"
        # id_from_name reaches the old class's data, and an id saved before still parses.
        assert await call(app, "COUNTER", "x", "value") == 3
        assert await call(app, "COUNTER", "y", "value") == 7
        assert str(namespace.idFromName("x")) == old_id
        assert await namespace.get(namespace.id_from_string(old_id)).value() == 3
        assert await call(app, "COUNTER", "x", "alarm_at") == due
        assert await call(app, "COUNTER", "x", "marked") == "running"
        assert app.host.statistics().pending_alarms == 1
        assert app.host.migrations is not None
        assert app.host.migrations.applied_tags() == ["v1", "v2"]
        assert await call(app, "COUNTER", "x", "add", 1) == 4


async def test_delete_refuses_without_confirmation_and_removes_with_it(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "add", 3) == 3

    delete = {"tag": "v2", "deleted_classes": ["Counter"]}
    project(root, bind={}, migrations=[V1, delete])
    app = make_app(root)
    with pytest.raises(ConfigError) as caught:
        await app.start()
    await app.stop()
    assert str(caught.value) == (
        'wrangler.jsonc:17: migrations[1].deleted_classes[0]: migration "v2" deletes class '
        f'"Counter" and its 1 stored object in {root.resolve()}/.dockyard/objects/Counter: '
        "confirm the deletion (run dockyard dev with --apply-deletions), or take "
        '"Counter" out of deleted_classes to keep them'
    )
    assert app.host.migrations is not None
    assert app.host.migrations.applied_tags() == ["v1"]

    # Refused means untouched: the previous version still reads its object.
    project(root, bind={"COUNTER": "Counter"}, migrations=[V1])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 3

    project(root, bind={}, migrations=[V1, delete])
    async with make_app(root, apply_deletions=True) as app:
        assert app.host.migrations is not None
        assert app.host.migrations.applied_tags() == ["v1", "v2"]
    assert not (root / ".dockyard" / "objects" / "Counter").exists()

    # A class made again under the deleted name starts empty.
    again = {"tag": "v3", "new_sqlite_classes": ["Counter"]}
    project(root, bind={"COUNTER": "Counter"}, migrations=[V1, delete, again])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 0


async def test_each_tag_is_applied_once_across_restarts(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1])
    async with make_app(root) as app:
        await call(app, "COUNTER", "x", "add", 3)

    # v2 renames Counter away, v3 makes a new Counter: were v2 applied again at a restart,
    # it would move the new Counter's objects onto Tally's.
    remake = {"tag": "v3", "new_sqlite_classes": ["Counter"]}
    project(root, bind={"TALLY": "Tally", "COUNTER": "Counter"}, migrations=[V1, RENAME, remake])
    async with make_app(root) as app:
        assert await call(app, "TALLY", "x", "value") == 3
        assert await call(app, "COUNTER", "x", "add", 1) == 1
        # The new Counter has ids of its own: Tally's "x" is not its "x".
        tally = app.env.TALLY
        counter = app.env.COUNTER
        assert str(tally.id_from_name("x")) != str(counter.id_from_name("x"))
    for _ in range(2):
        async with make_app(root) as app:
            assert await call(app, "TALLY", "x", "value") == 3
            assert await call(app, "COUNTER", "x", "value") == 1
            assert app.host.migrations is not None
            assert app.host.migrations.applied_tags() == ["v1", "v2", "v3"]


async def test_a_rename_without_a_migration_is_a_config_error(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1])
    async with make_app(root) as app:
        await call(app, "COUNTER", "x", "add", 3)

    project(root, bind={"COUNTER": "Tally"}, migrations=[V1])
    app = make_app(root)
    with pytest.raises(ConfigError) as caught:
        await app.start()
    await app.stop()
    assert caught.value.file == "wrangler.jsonc"
    assert caught.value.path == "migrations"
    assert str(caught.value) == (
        'wrangler.jsonc:12: migrations: class "Counter" has 1 stored object in '
        f"{root.resolve()}/.dockyard/objects/Counter, but the config binds no such class and "
        'the worker no longer defines it. If it was renamed, add {"tag": "v2", '
        '"renamed_classes": [{"from": "Counter", "to": "Tally"}]} to migrations; to drop its '
        'objects, add {"tag": "v2", "deleted_classes": ["Counter"]}; to keep it as it is, '
        "bind or define it again"
    )
    # Nothing moved: with the migration the fix names, the data is there.
    project(root, bind={"COUNTER": "Tally"}, migrations=[V1, RENAME])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 3


def test_bindings_to_a_class_migrated_away_are_config_errors(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1, RENAME])
    with pytest.raises(ConfigError) as caught:
        load_config(root)
    assert str(caught.value) == (
        'wrangler.jsonc:8: durable_objects.bindings[0].class_name: class "Counter" is '
        'renamed to "Tally" by migrations[1]; expected "class_name": "Tally" here'
    )
    twice = {"tag": "v2", "renamed_classes": [{"from": "Counter", "to": "Tally"}]}
    project(root, bind={"COUNTER": "Tally"}, migrations=[V1, RENAME, twice])
    with pytest.raises(ConfigError, match=r'migrations\[2\]\.tag: duplicate tag "v2"'):
        load_config(root)


async def test_a_transfer_is_refused_with_the_reason(tmp_path: Path) -> None:
    transfer = {
        "tag": "v2",
        "transferred_classes": [{"from": "Old", "from_script": "other", "to": "Counter"}],
    }
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1, transfer])
    assert not [w for w in load_config(root).warnings if "transferred" in w]
    app = make_app(root)
    with pytest.raises(ConfigError, match=r"transferred_classes\[0\]: .* cannot move them"):
        await app.start()
    await app.stop()


# Two classes holding objects ("x": 3 and 5), then a version that renames both.
BOTH = {"tag": "v1", "new_sqlite_classes": ["Counter", "Other"]}
OLD_BIND = {"COUNTER": "Counter", "OTHER": "Other"}
RENAMES = {
    "tag": "v2",
    "renamed_classes": [{"from": "Counter", "to": "Tally"}, {"from": "Other", "to": "Another"}],
}
NEW_BIND = {"COUNTER": "Tally", "OTHER": "Another"}


async def two_classes_to_rename(root: Path) -> Path:
    """The old version run once (its objects stored), then the new one written, not run."""
    project(root, bind=OLD_BIND, migrations=[BOTH])
    async with make_app(root) as app:
        await call(app, "COUNTER", "x", "add", 3)
        await call(app, "OTHER", "x", "add", 5)
    project(root, bind=NEW_BIND, migrations=[BOTH, RENAMES])
    return root


async def old_state_then_new(root: Path) -> None:
    """After a v2 that did not complete: the old version starts on the old state, whole
    (the half-applied tag undone), then the new version applies the tag whole."""
    project(root, bind=OLD_BIND, migrations=[BOTH])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 3
        assert await call(app, "OTHER", "x", "value") == 5
        assert app.host.migrations is not None
        assert app.host.migrations.applied_tags() == ["v1"]

    project(root, bind=NEW_BIND, migrations=[BOTH, RENAMES])
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 3
        assert await call(app, "OTHER", "x", "value") == 5
        assert app.host.migrations is not None
        assert app.host.migrations.applied_tags() == ["v1", "v2"]


async def test_a_failure_mid_apply_leaves_the_old_state(tmp_path: Path) -> None:
    root = await two_classes_to_rename(tmp_path / "p")
    app = make_app(root)
    assert app.host.migrations is not None
    moved: list[tuple[str, str]] = []

    def fail_after_first(source: str, target: str) -> None:
        moved.append((source, target))
        raise OSError("injected: disk gone")

    app.host.migrations.on_move = fail_after_first
    with pytest.raises(OSError, match="injected"):
        await app.start()
    await app.stop()
    assert moved == [("Counter", "Tally")]

    await old_state_then_new(root)


KILLER = """
import asyncio, os, signal, sys
from pathlib import Path
from dockyard.app import App
from dockyard.settings import Settings

root = Path(sys.argv[1])
app = App(root, settings=Settings(state_dir=root / ".dockyard"))

def die(source, target):
    print("moved", source, target, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

app.host.migrations.on_move = die
asyncio.run(app.start())
"""


async def test_sigkill_mid_apply_leaves_the_old_state_then_applies(tmp_path: Path) -> None:
    root = await two_classes_to_rename(tmp_path / "p")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLER, str(root), stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert out.decode() == "moved Counter Tally\n"
    # Killed between the two renames: one class folder is already at its new name.
    objects = root / ".dockyard" / "objects"
    assert (objects / "Tally").is_dir() and (objects / "Other").is_dir()

    await old_state_then_new(root)


async def test_chained_renames_apply_in_order_and_a_rename_onto_objects_is_refused(
    tmp_path: Path,
) -> None:
    both = {"tag": "v1", "new_sqlite_classes": ["Counter", "Other"]}
    root = project(tmp_path / "p", bind={"COUNTER": "Counter", "OTHER": "Other"}, migrations=[both])
    async with make_app(root) as app:
        await call(app, "COUNTER", "x", "add", 3)
        await call(app, "OTHER", "x", "add", 5)

    # Onto a class that has objects: refused, and nothing moves (Counter is still read).
    onto = {"tag": "v2", "renamed_classes": [{"from": "Counter", "to": "Other"}]}
    project(root, bind={"OTHER": "Other"}, migrations=[both, onto])
    app = make_app(root)
    with pytest.raises(ConfigError, match=r'"Other" already has stored data \(1 stored object\)'):
        await app.start()
    await app.stop()

    # Two tags pending at once: Counter -> Tally -> Score, applied in order, ids kept.
    chain = [
        both,
        {"tag": "v2", "renamed_classes": [{"from": "Counter", "to": "Tally"}]},
        {"tag": "v3", "renamed_classes": [{"from": "Tally", "to": "Score"}]},
    ]
    project(root, bind={"COUNTER": "Score", "OTHER": "Other"}, migrations=chain)
    async with make_app(root) as app:
        assert await call(app, "COUNTER", "x", "value") == 3
        assert await call(app, "OTHER", "x", "value") == 5
        assert app.host.migrations is not None
        assert app.host.migrations.applied_tags() == ["v1", "v2", "v3"]


@pytest.mark.slow
async def test_dockyard_dev_deletes_a_class_only_with_apply_deletions(tmp_path: Path) -> None:
    root = project(tmp_path / "p", bind={"COUNTER": "Counter"}, migrations=[V1])
    async with make_app(root) as app:
        await call(app, "COUNTER", "x", "add", 3)
    delete = {"tag": "v2", "deleted_classes": ["Counter"]}
    project(root, bind={}, migrations=[V1, delete])
    folder = root / ".dockyard" / "objects" / "Counter"

    server = DevServer(root)
    try:
        with pytest.raises(AssertionError):
            server.start(timeout=60)
    finally:
        code = server.stop()
    assert code == 2
    assert "confirm the deletion (run dockyard dev with --apply-deletions)" in server.output
    assert "Traceback" not in server.output
    assert folder.is_dir()

    with DevServer(root, "--apply-deletions"):
        assert not folder.exists()
