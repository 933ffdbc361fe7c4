"""The node's state in one SQLite file: apps, versions, secrets, deploy locks, rollouts,
admin tokens and a few settings of its own.

Durability first: WAL with ``synchronous=FULL``, so a write the node acknowledged survives
a power cut, and every change runs in one ``BEGIN IMMEDIATE`` transaction (``_write``), so
a crash never leaves half of one. Dicts and lists are JSON text columns. The schema is
versioned in ``meta.schema_version``: a later release appends a step to ``_MIGRATIONS``,
and a node refuses a file written by a newer schema instead of guessing at it.

The node uses the store from its event loop thread; every call is a few indexed
statements on a local file, so it is synchronous. A lock still guards the connection, in
case a caller hands a call to a worker thread.

Only ciphertext of secrets (see ``SecretBox``) and hashes of tokens are stored.

Over 400 lines: one SQLite file and one schema: its records and each table's queries
share the connection, the transactions and the migrations of the schema.
"""

from __future__ import annotations

import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeployConflict, DockyardError, InvalidArgument
from .paths import validate_app_name

__all__ = [
    "FIRST_UID",
    "AppRecord",
    "DeployConflict",
    "NodeStore",
    "RolloutRecord",
    "VersionRecord",
]

# App processes run as uid FIRST_UID + n (n counts every app ever created on this node and
# is never reused: a new app must not inherit files a deleted one left owned by its uid).
# 61000-65533 is unused by the usual distributions' system and user ranges.
FIRST_UID = 61000
ROLLOUT_STRATEGIES = ("gradual", "immediate", "none")
ROLLOUT_STATES = ("running", "done", "failed")
TOKEN_SCOPES = ("admin", "read")


@dataclass(frozen=True)
class AppRecord:
    name: str
    uid: int
    created_at: float
    active_version: int | None


@dataclass(frozen=True)
class VersionRecord:
    app: str
    number: int
    created_at: float
    bundle_hash: str
    images: dict[str, str]
    vars: dict[str, Any]
    secret_names: list[str]
    config: dict[str, Any]
    message: str
    rollout: str


@dataclass
class RolloutRecord:
    app: str
    version: int
    from_version: int | None
    state: str
    steps: list[int]
    step: int
    replaced: list[str]
    total: int
    started_at: float
    updated_at: float
    error: str | None


# Each entry moves the schema from version i to i + 1, inside the transaction that records
# the new version. Never edit a released entry; append.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        uid INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        active_version INTEGER
    );
    CREATE TABLE versions (
        app TEXT NOT NULL,
        number INTEGER NOT NULL,
        created_at REAL NOT NULL,
        bundle_hash TEXT NOT NULL,
        images TEXT NOT NULL,
        vars TEXT NOT NULL,
        secret_names TEXT NOT NULL,
        config TEXT NOT NULL,
        message TEXT NOT NULL,
        rollout TEXT NOT NULL,
        PRIMARY KEY (app, number)
    );
    CREATE TABLE secrets (
        app TEXT NOT NULL,
        name TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (app, name)
    );
    CREATE TABLE deploys (
        app TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        started_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE rollouts (
        app TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        from_version INTEGER,
        state TEXT NOT NULL,
        steps TEXT NOT NULL,
        step INTEGER NOT NULL,
        replaced TEXT NOT NULL,
        total INTEGER NOT NULL,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        error TEXT
    );
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class NodeStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (creating it 0600 if new) and migrate the store at ``path``. ``clock`` is
        the wall clock for timestamps and deploy lock expiry (tests pass their own)."""
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        # Create the file ourselves so it is 0600 from its first byte; SQLite gives the
        # -wal and -shm files the database file's mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DockyardError(f"cannot open the node's store {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DockyardError(f"{self.path}: SQLite refused WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise DockyardError(
                f"the node's store {self.path} cannot be read ({exc}); restore it from a backup"
            ) from None
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception
        (cancellation included). IMMEDIATE takes the write lock up front, so the reads a
        change is based on cannot go stale before it commits."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                # SQLite may already have rolled back (on a full disk, say).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, params)
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise DockyardError(
                    f"the node's store {self.path} has schema version {current}, written by a "
                    f"newer dockyard; this one knows up to {SCHEMA_VERSION}: upgrade dockyard"
                )
            for script in _MIGRATIONS[current:]:
                # executescript() would COMMIT first; run the statements one by one instead.
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    # Meta: the node's own small settings (its owner label, the uid counter, ...).

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # Apps

    def ensure_app(self, name: str) -> AppRecord:
        """The app called ``name``, created (with the next never-used uid) if new."""
        validate_app_name(name)
        with self._write() as db:
            return self._ensure_app(db, name)

    def _ensure_app(self, db: sqlite3.Connection, name: str) -> AppRecord:
        row = db.execute(
            "SELECT name, uid, created_at, active_version FROM apps WHERE name = ?", (name,)
        ).fetchone()
        if row is not None:
            return AppRecord(*row)
        counter = db.execute("SELECT value FROM meta WHERE key = 'apps_created'").fetchone()
        n = int(counter[0]) if counter else 0
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('apps_created', ?)", (str(n + 1),)
        )
        record = AppRecord(
            name=name, uid=FIRST_UID + n, created_at=self._clock(), active_version=None
        )
        db.execute(
            "INSERT INTO apps (name, uid, created_at, active_version) VALUES (?, ?, ?, NULL)",
            (record.name, record.uid, record.created_at),
        )
        return record

    def get_app(self, name: str) -> AppRecord | None:
        rows = self._read(
            "SELECT name, uid, created_at, active_version FROM apps WHERE name = ?", (name,)
        )
        return AppRecord(*rows[0]) if rows else None

    def list_apps(self) -> list[AppRecord]:
        rows = self._read("SELECT name, uid, created_at, active_version FROM apps ORDER BY name")
        return [AppRecord(*row) for row in rows]

    def delete_app(self, name: str) -> None:
        """Forget the app with its versions, secrets, deploy lock and rollout. Its uid is
        not freed. A no-op for an unknown app."""
        with self._write() as db:
            for table, column in (
                ("apps", "name"),
                ("versions", "app"),
                ("secrets", "app"),
                ("deploys", "app"),
                ("rollouts", "app"),
            ):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

    def set_active_version(self, app: str, number: int) -> None:
        """Raises InvalidArgument when the app or that version of it does not exist."""
        with self._write() as db:
            found = db.execute(
                "SELECT 1 FROM versions WHERE app = ? AND number = ?", (app, number)
            ).fetchone()
            if found is None:
                raise InvalidArgument(f"app {app!r} has no version {number}")
            db.execute("UPDATE apps SET active_version = ? WHERE name = ?", (number, app))

    # Versions

    def add_version(
        self,
        app: str,
        *,
        bundle_hash: str,
        images: dict[str, str],
        vars: dict[str, Any],
        secret_names: list[str],
        config: dict[str, Any],
        message: str,
        rollout: str,
    ) -> VersionRecord:
        """Record the next version of ``app`` (creating the app if new): number = the
        highest so far + 1. It does not become active (see ``set_active_version``)."""
        validate_app_name(app)
        if rollout not in ROLLOUT_STRATEGIES:
            raise InvalidArgument(f"rollout must be one of {', '.join(ROLLOUT_STRATEGIES)}")
        with self._write() as db:
            self._ensure_app(db, app)
            (highest,) = db.execute(
                "SELECT COALESCE(MAX(number), 0) FROM versions WHERE app = ?", (app,)
            ).fetchone()
            record = VersionRecord(
                app=app,
                number=highest + 1,
                created_at=self._clock(),
                bundle_hash=bundle_hash,
                images=dict(images),
                vars=dict(vars),
                secret_names=sorted(secret_names),
                config=dict(config),
                message=message,
                rollout=rollout,
            )
            db.execute(
                "INSERT INTO versions (app, number, created_at, bundle_hash, images, vars,"
                " secret_names, config, message, rollout) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.app,
                    record.number,
                    record.created_at,
                    record.bundle_hash,
                    _dump(record.images),
                    _dump(record.vars),
                    _dump(record.secret_names),
                    _dump(record.config),
                    record.message,
                    record.rollout,
                ),
            )
        return record

    _VERSION_COLUMNS = (
        "app, number, created_at, bundle_hash, images, vars, secret_names, config, message, rollout"
    )

    @staticmethod
    def _version(row: sqlite3.Row) -> VersionRecord:
        return VersionRecord(
            app=row["app"],
            number=row["number"],
            created_at=row["created_at"],
            bundle_hash=row["bundle_hash"],
            images=json.loads(row["images"]),
            vars=json.loads(row["vars"]),
            secret_names=json.loads(row["secret_names"]),
            config=json.loads(row["config"]),
            message=row["message"],
            rollout=row["rollout"],
        )

    def get_version(self, app: str, number: int) -> VersionRecord | None:
        rows = self._read(
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE app = ? AND number = ?",
            (app, number),
        )
        return self._version(rows[0]) if rows else None

    def list_versions(self, app: str) -> list[VersionRecord]:
        """Newest first."""
        rows = self._read(
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE app = ? ORDER BY number DESC",
            (app,),
        )
        return [self._version(row) for row in rows]

    def referenced_images(self) -> set[str]:
        """Every image ("repo@sha256:...") that any version of any app names: what image
        pruning must keep, since a rollback may need any of them."""
        rows = self._read("SELECT images FROM versions")
        return {image for row in rows for image in json.loads(row["images"]).values()}

    # Secrets (ciphertext from SecretBox; the store never sees a plaintext)

    def put_secret(self, app: str, name: str, ciphertext: bytes) -> None:
        """Set (or replace) a secret, creating the app if new: secrets may be put before
        an app's first deploy, which then picks them up."""
        validate_app_name(app)
        if not name or len(name) > 256 or not name.isprintable():
            raise InvalidArgument(f"invalid secret name {name!r}: 1-256 printable characters")
        with self._write() as db:
            self._ensure_app(db, app)
            db.execute(
                "INSERT OR REPLACE INTO secrets (app, name, ciphertext, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (app, name, bytes(ciphertext), self._clock()),
            )

    def delete_secret(self, app: str, name: str) -> bool:
        """True when there was such a secret."""
        with self._write() as db:
            cursor = db.execute("DELETE FROM secrets WHERE app = ? AND name = ?", (app, name))
            return cursor.rowcount > 0

    def secret_names(self, app: str) -> list[str]:
        rows = self._read("SELECT name FROM secrets WHERE app = ? ORDER BY name", (app,))
        return [row["name"] for row in rows]

    def secret_ciphertexts(self, app: str) -> dict[str, bytes]:
        rows = self._read("SELECT name, ciphertext FROM secrets WHERE app = ?", (app,))
        return {row["name"]: bytes(row["ciphertext"]) for row in rows}

    # Deploy locks: one open deploy per app, until it ends or its ttl passes.

    def begin_deploy(self, app: str, deploy_id: str, ttl: float) -> None:
        """Take ``app``'s deploy lock for ``ttl`` seconds. Raises DeployConflict while
        another deploy holds an unexpired lock; an expired one is taken over. Beginning
        again with the same id renews the lock."""
        validate_app_name(app)
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT id, expires_at FROM deploys WHERE app = ?", (app,)).fetchone()
            if row is not None and row[0] != deploy_id and row[1] > now:
                raise DeployConflict(
                    f"another deploy of {app} is in progress; it ends when it finishes or is "
                    f"aborted, or in {max(1, round(row[1] - now))} s if its client went away"
                )
            started = now if row is None or row[0] != deploy_id else None
            db.execute(
                "INSERT INTO deploys (app, id, started_at, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (app) DO UPDATE SET id = excluded.id,"
                " started_at = COALESCE(?, started_at), expires_at = excluded.expires_at",
                (app, deploy_id, now, now + ttl, started),
            )

    def get_deploy(self, app: str, deploy_id: str) -> dict[str, Any] | None:
        """The open deploy ``deploy_id`` of ``app``: {"id", "app", "started_at",
        "expires_at"}; None if unknown, ended, taken over or expired."""
        rows = self._read(
            "SELECT id, app, started_at, expires_at FROM deploys WHERE app = ? AND id = ?",
            (app, deploy_id),
        )
        if not rows or rows[0]["expires_at"] <= self._clock():
            return None
        return dict(rows[0])

    def end_deploy(self, app: str, deploy_id: str) -> None:
        """Release the lock if ``deploy_id`` still holds it; otherwise a no-op."""
        with self._write() as db:
            db.execute("DELETE FROM deploys WHERE app = ? AND id = ?", (app, deploy_id))

    # Rollouts: at most one per app, the latest.

    def save_rollout(self, rollout: RolloutRecord) -> None:
        if rollout.state not in ROLLOUT_STATES:
            raise InvalidArgument(f"rollout state must be one of {', '.join(ROLLOUT_STATES)}")
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO rollouts (app, version, from_version, state, steps,"
                " step, replaced, total, started_at, updated_at, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout.app,
                    rollout.version,
                    rollout.from_version,
                    rollout.state,
                    _dump(rollout.steps),
                    rollout.step,
                    _dump(rollout.replaced),
                    rollout.total,
                    rollout.started_at,
                    rollout.updated_at,
                    rollout.error,
                ),
            )

    @staticmethod
    def _rollout(row: sqlite3.Row) -> RolloutRecord:
        return RolloutRecord(
            app=row["app"],
            version=row["version"],
            from_version=row["from_version"],
            state=row["state"],
            steps=json.loads(row["steps"]),
            step=row["step"],
            replaced=json.loads(row["replaced"]),
            total=row["total"],
            started_at=row["started_at"],
            updated_at=row["updated_at"],
            error=row["error"],
        )

    def get_rollout(self, app: str) -> RolloutRecord | None:
        rows = self._read("SELECT * FROM rollouts WHERE app = ?", (app,))
        return self._rollout(rows[0]) if rows else None

    def running_rollouts(self) -> list[RolloutRecord]:
        rows = self._read("SELECT * FROM rollouts WHERE state = 'running' ORDER BY app")
        return [self._rollout(row) for row in rows]

    # Admin tokens (hashes only; see tokens.py)

    def add_token(self, token_hash: str, scope: str) -> None:
        with self._write() as db:
            self._add_token(db, token_hash, scope)

    def replace_tokens(self, token_hash: str, scope: str) -> None:
        """Remove every token and add this one, in one transaction (token rotation)."""
        with self._write() as db:
            db.execute("DELETE FROM tokens")
            self._add_token(db, token_hash, scope)

    def _add_token(self, db: sqlite3.Connection, token_hash: str, scope: str) -> None:
        if scope not in TOKEN_SCOPES:
            raise InvalidArgument(f"token scope must be one of {', '.join(TOKEN_SCOPES)}")
        db.execute(
            "INSERT OR REPLACE INTO tokens (hash, scope, created_at) VALUES (?, ?, ?)",
            (token_hash, scope, self._clock()),
        )

    def token_scope(self, token_hash: str) -> str | None:
        """The scope of the token with this hash, None if unknown. Every stored hash is
        compared in constant time, with no early exit, so timing tells nothing about how
        close a guess came (an indexed lookup would)."""
        found: str | None = None
        candidate = token_hash.encode()
        for row in self._read("SELECT hash, scope FROM tokens"):
            if hmac.compare_digest(row["hash"].encode(), candidate):
                found = row["scope"]
        return found

    def has_tokens(self) -> bool:
        return bool(self._read("SELECT 1 FROM tokens LIMIT 1"))

    def remove_tokens(self, scope: str | None = None) -> None:
        """Remove every token, or every token of ``scope``."""
        with self._write() as db:
            if scope is None:
                db.execute("DELETE FROM tokens")
            else:
                db.execute("DELETE FROM tokens WHERE scope = ?", (scope,))
