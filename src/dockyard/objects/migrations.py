"""Class migrations: the config's ``migrations`` applied to the stored objects, once each.

On disk a class is one folder, ``objects/<ClassName>/``: one SQLite file per object (its
keys, SQL tables, container state and schedules) and ``_alarms.sqlite``, the class's
alarm index. So a rename moves one folder, and a deletion removes one.

Ids. An object id is an HMAC keyed by the app and the class's *id key*, which is the
class name unless a migration said otherwise: a renamed class keeps the id key of the
class it came from (a chain ``A -> B -> C`` keeps ``A``'s), so ``id_from_name("x")`` on
the new class is the id the old class had for ``"x"``, an id string saved before the
rename still parses, and the moved files keep their names. A new class that reuses a
name whose key a renamed class holds gets a key of its own (``Name`` + the tag).

The record is ``objects/_migrations.sqlite``: the tags applied (in order), the id keys
that differ from the class name, and a journal of the folder moves of the tag being
applied. Applying a tag, crash-safe by an undo journal:

1. every check is made first (target folders free, deletions confirmed, no transfer),
   against the folders as they are and as the tags before would leave them: a refused
   migration changes nothing;
2. the tag's moves are written to the journal (one SQLite transaction);
3. each class folder is renamed (``os.rename``, atomic on one file system): a rename to
   its new name, a deletion to a hidden ``.deleted-<hex>`` folder; the folder is then
   fsynced;
4. one SQLite transaction records the tag, updates the id keys and clears the journal:
   this is the moment the tag is applied;
5. the hidden folders of deleted classes are removed.

A crash (or an error) before step 4 leaves journal rows: the next ``apply()``, or the
error handler at once, renames every moved folder back, so the state is the old one and
the tag is applied again from the start. After step 4 it is the new one; a leftover
``.deleted-*`` folder is removed at the next start. Nothing opens object storage while
this runs: ``ObjectHost.start`` applies migrations before its alarms or any object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dockyard.errors import ConfigError

from .files import private_dir, private_file

__all__ = ["RECORD_FILE", "ClassMigrations", "MigrationStep"]

log = logging.getLogger("dockyard.objects")

RECORD_FILE = "_migrations.sqlite"
ALARM_INDEX = "_alarms.sqlite"
_TRASH_PREFIX = ".deleted-"

# (config path, message) -> the error to raise; the app's names the file and line.
ErrorAt = Callable[[str, str], ConfigError]


def _plain_error(path: str, message: str) -> ConfigError:
    return ConfigError(message, path=path)


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """One entry of the config's ``migrations`` (``index`` is its position there)."""

    tag: str
    index: int
    new_classes: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()  # (from, to)
    deleted: tuple[str, ...] = ()
    transferred: tuple[tuple[str, str, str], ...] = ()  # (from_script, from, to)


@dataclass(slots=True)
class _Plan:
    """What a tag does to the folders, worked out (and checked) before anything moves."""

    step: MigrationStep
    moves: list[tuple[str, str]] = field(default_factory=list)  # folder names
    keys: dict[str, str | None] = field(default_factory=dict)  # class -> id key (None: drop)


class ClassMigrations:
    """Applies the config's migrations to one app's ``objects`` folder.

    ``bound`` are the classes the config binds, ``defined`` the names the worker's main
    module defines: a class with stored objects that is neither, and that no migration
    renames or deletes, is refused as a config error (its data would be orphaned).
    ``apply_deletions`` confirms ``deleted_classes`` of classes that have stored objects;
    without it such a migration is refused. ``on_move(source, target)``, if set, is
    called after each folder move (a seam for tests to crash mid-apply).
    """

    def __init__(
        self,
        objects_dir: Path,
        steps: Sequence[MigrationStep],
        *,
        bound: set[str],
        defined: set[str],
        apply_deletions: bool = False,
        error_at: ErrorAt = _plain_error,
        deletion_hint: str = "",
    ) -> None:
        self.objects_dir = Path(objects_dir)
        self.steps = list(steps)
        self.bound = set(bound)
        self.defined = set(defined)
        self.apply_deletions = apply_deletions
        self.error_at = error_at
        # How to confirm a deletion where this runs (dev: a command-line flag).
        self.deletion_hint = deletion_hint
        self.on_move: Callable[[str, str], None] | None = None

    # -- reading the record --------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.objects_dir / RECORD_FILE

    def applied_tags(self) -> list[str]:
        """The tags applied so far, in the order they were applied."""
        with self._record(create=False) as conn:
            if conn is None:
                return []
            return [tag for (tag,) in conn.execute("SELECT tag FROM applied ORDER BY seq")]

    def id_keys(self) -> dict[str, str]:
        """The id key of every class whose key is not its own name (see the module doc)."""
        with self._record(create=False) as conn:
            if conn is None:
                return {}
            return dict(conn.execute("SELECT class_name, id_key FROM id_keys").fetchall())

    # -- checking and applying -----------------------------------------------------------

    def check(self) -> None:
        """Raise the ConfigError that ``apply()`` would, changing nothing.

        Read-only, so a node can run it before it stops an app's previous process.
        """
        self._plans(self._stored(), set(self.applied_tags()), self.id_keys())

    def apply(self) -> dict[str, str]:
        """Apply every pending tag in config order; return the id keys (as ``id_keys``).

        The caller holds the app's state lock: nothing else touches the folder meanwhile.
        """
        private_dir(self.objects_dir)
        with self._record(create=True) as conn:
            assert conn is not None
            self._recover(conn)
            applied = {tag for (tag,) in conn.execute("SELECT tag FROM applied")}
            keys = dict(conn.execute("SELECT class_name, id_key FROM id_keys").fetchall())
            for plan in self._plans(self._stored(), applied, keys):
                self._apply(conn, plan)
            return dict(conn.execute("SELECT class_name, id_key FROM id_keys").fetchall())

    def _plans(
        self, stored: dict[str, int], applied: set[str], keys: dict[str, str]
    ) -> list[_Plan]:
        """Every pending tag's moves and id keys, checked against the folders as the tags
        before it leave them; then the end state checked for orphaned classes."""
        stored = dict(stored)
        keys = dict(keys)
        plans = []
        for step in self.steps:
            if step.tag in applied:
                continue
            plan = self._plan(step, stored, keys)
            for source, target in plan.moves:
                count = stored.pop(source, 0)
                if not target.startswith(_TRASH_PREFIX):
                    stored[target] = count
            for name, key in plan.keys.items():
                if key is None:
                    keys.pop(name, None)
                else:
                    keys[name] = key
            plans.append(plan)
        self._check_orphans(stored)
        return plans

    def _plan(self, step: MigrationStep, stored: dict[str, int], keys: dict[str, str]) -> _Plan:
        where = f"migrations[{step.index}]"
        plan = _Plan(step)
        if step.transferred:
            script, source, target = step.transferred[0]
            raise self.error_at(
                f"{where}.transferred_classes[0]",
                f'migration "{step.tag}" transfers class "{source}" of script "{script}" to '
                f'"{target}": Dockyard keeps each app\'s objects in its own folder, out of '
                f"this app's reach, so it cannot move them (see docs/migrations.md). Remove "
                f"this entry if the other script has no objects here to keep; the class "
                f"then starts empty",
            )
        for i, (source, target) in enumerate(step.renamed):
            if target in stored:
                raise self.error_at(
                    f"{where}.renamed_classes[{i}].to",
                    f'migration "{step.tag}" renames class "{source}" to "{target}", but '
                    f'"{target}" already has stored data ({_objects(stored[target])}) in '
                    f"{self.objects_dir / target}; a rename needs a class without any (delete "
                    f'it first with a migration whose deleted_classes has "{target}")',
                )
            if source in stored:
                plan.moves.append((source, target))
            plan.keys[target] = keys.get(source, source)
            plan.keys[source] = None
        for i, name in enumerate(step.deleted):
            count = stored.get(name, 0)
            if count and not self.apply_deletions:
                hint = f" ({self.deletion_hint})" if self.deletion_hint else ""
                raise self.error_at(
                    f"{where}.deleted_classes[{i}]",
                    f'migration "{step.tag}" deletes class "{name}" and its '
                    f"{_objects(count)} in {self.objects_dir / name}: confirm the deletion"
                    f'{hint}, or take "{name}" out of deleted_classes to keep them',
                )
            if name in stored:
                plan.moves.append((name, f"{_TRASH_PREFIX}{secrets.token_hex(8)}"))
            plan.keys[name] = None
        held = {key for name, key in keys.items() if plan.keys.get(name, "") is not None}
        held |= {key for key in plan.keys.values() if key is not None}
        for name in step.new_classes:
            if name in held and plan.keys.get(name) is None:
                # A renamed class holds this name's key: the new class needs its own ids.
                plan.keys[name] = f"{name}\x00{step.tag}"
        return plan

    def _check_orphans(self, stored: dict[str, int]) -> None:
        lost = sorted(n for n, c in stored.items() if c and n not in self.bound | self.defined)
        if not lost:
            return
        name = lost[0]
        empty = sorted(c for c in self.bound if not stored.get(c))
        target = empty[0] if len(empty) == 1 else "NewName"
        tag = f"v{len(self.steps) + 1}"
        rename = json.dumps({"tag": tag, "renamed_classes": [{"from": name, "to": target}]})
        delete = json.dumps({"tag": tag, "deleted_classes": [name]})
        raise self.error_at(
            "migrations",
            f'class "{name}" has {_objects(stored[name])} in {self.objects_dir / name}, '
            f"but the config binds no such class and the worker no longer defines it. If "
            f"it was renamed, add {rename} to migrations; to drop its objects, add {delete}; "
            f"to keep it as it is, bind or define it again",
        )

    def _apply(self, conn: sqlite3.Connection, plan: _Plan) -> None:
        tag = plan.step.tag
        with _transaction(conn):
            conn.executemany(
                "INSERT INTO journal (tag, source, target) VALUES (?, ?, ?)",
                [(tag, source, target) for source, target in plan.moves],
            )
        try:
            for source, target in plan.moves:
                os.rename(self.objects_dir / source, self.objects_dir / target)
                if self.on_move is not None:
                    self.on_move(source, target)
            _fsync_dir(self.objects_dir)
            with _transaction(conn):
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM applied").fetchone()[0]
                conn.execute(
                    "INSERT INTO applied (tag, seq, applied_at) VALUES (?, ?, ?)",
                    (tag, seq, time.time()),
                )
                for name, key in plan.keys.items():
                    if key is None or key == name:
                        conn.execute("DELETE FROM id_keys WHERE class_name = ?", (name,))
                    else:
                        conn.execute(
                            "INSERT OR REPLACE INTO id_keys (class_name, id_key) VALUES (?, ?)",
                            (name, key),
                        )
                conn.execute("DELETE FROM journal WHERE tag = ?", (tag,))
        except BaseException:
            # Cancellation and KeyboardInterrupt too: the old state, whatever stopped us.
            self._recover(conn)
            raise
        for _, target in plan.moves:
            if target.startswith(_TRASH_PREFIX):
                shutil.rmtree(self.objects_dir / target, ignore_errors=True)
        if plan.moves or plan.keys:
            done = ", ".join(
                f"{s} deleted" if t.startswith(_TRASH_PREFIX) else f"{s} -> {t}"
                for s, t in plan.moves
            )
            log.info("Applied migration %s%s", tag, f" ({done})" if done else "")

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Undo the moves of a tag that was not recorded; drop deleted classes' leftovers."""
        rows = conn.execute("SELECT seq, tag, source, target FROM journal ORDER BY seq").fetchall()
        for _, tag, source, target in reversed(rows):
            moved, home = self.objects_dir / target, self.objects_dir / source
            if moved.exists() and not home.exists():
                os.rename(moved, home)
                log.warning("Migration %s was interrupted: moved %s back", tag, source)
        if rows:
            _fsync_dir(self.objects_dir)
            with _transaction(conn):
                conn.execute("DELETE FROM journal")
        for leftover in self.objects_dir.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- the folders and the record ------------------------------------------------------

    def _stored(self) -> dict[str, int]:
        """Every class folder with stored data -> its number of objects."""
        stored: dict[str, int] = {}
        if not self.objects_dir.is_dir():
            return stored
        for folder in self.objects_dir.iterdir():
            # Class names are identifiers: a dot folder is a deleted class's leftover.
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            files = [f.name for f in folder.glob("*.sqlite")]
            if files:
                stored[folder.name] = sum(1 for f in files if f != ALARM_INDEX)
        return stored

    @contextlib.contextmanager
    def _record(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        path = self.record_path
        if not create and not path.exists():
            yield None
            return
        if create:
            private_file(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            if create:
                conn.executescript(_SCHEMA)
            yield conn
        finally:
            conn.close()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (tag TEXT PRIMARY KEY, seq INTEGER NOT NULL,
    applied_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS id_keys (class_name TEXT PRIMARY KEY, id_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, tag TEXT NOT NULL,
    source TEXT NOT NULL, target TEXT NOT NULL);
"""


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable before the record says they happened."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _objects(count: int) -> str:
    return f"{count} stored object" + ("" if count == 1 else "s")
