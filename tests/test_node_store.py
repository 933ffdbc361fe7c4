"""The node's state: data folder layout, the SQLite store, secrets at rest, admin tokens.

Real SQLite files and key files in tmp_path; no engine. A hand-driven clock stands in
for time where expiry matters, so nothing sleeps.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.errors import DeployConflict, DockyardError, InvalidArgument
from dockyard.node.paths import NodePaths, default_data_dir, validate_app_name
from dockyard.node.secrets import SecretBox
from dockyard.node.store import NodeStore, RolloutRecord, VersionRecord
from dockyard.node.tokens import Tokens, hash_token, new_token

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
HASH = "0123456789abcdef" * 4


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "node.db"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[NodeStore]:
    opened = NodeStore(db_path, clock=clock)
    yield opened
    opened.close()


def add(store: NodeStore, app: str = "shop", **changes: Any) -> VersionRecord:
    fields: dict[str, Any] = {
        "bundle_hash": HASH,
        "images": {"Web": f"{app}/web@{DIGEST_A}"},
        "vars": {"MODE": "prod", "LIMITS": [1, 2]},
        "secret_names": ["TOKEN", "API_KEY"],
        "config": {"main": "src/entry.py", "classes": ["Web"], "routes": ["shop.example"]},
        "message": "first",
        "rollout": "gradual",
    }
    fields.update(changes)
    return store.add_version(app, **fields)


# Data folder


def test_paths_lay_out_the_data_folder(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path / "data")
    root = tmp_path / "data"
    assert paths.db == root / "node.db"
    assert paths.secret_key == root / "secret.key"
    assert paths.registry_dir == root / "registry"
    assert paths.uploads_dir == root / "uploads"
    assert paths.run_dir == root / "run"
    assert paths.lock == root / "serve.lock"
    assert paths.app_dir("shop") == root / "apps" / "shop"
    assert paths.state_dir("shop") == root / "apps" / "shop" / "state"
    assert paths.bundle_dir("shop", HASH) == root / "apps" / "shop" / "bundles" / HASH
    assert paths.app_run_dir("shop") == root / "run" / "shop"


def test_paths_refuse_names_that_would_escape_the_folder(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path)
    for bad in ("..", "../etc", "a/b", "", "Shop"):
        with pytest.raises(InvalidArgument, match="invalid app name"):
            paths.app_dir(bad)
        with pytest.raises(InvalidArgument, match="invalid app name"):
            paths.app_run_dir(bad)
    with pytest.raises(InvalidArgument, match="64 lowercase hex digits"):
        paths.bundle_dir("shop", "../../x")


def test_ensure_makes_private_folders_and_fixes_modes(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path / "deep" / "data")
    paths.ensure()
    assert mode(paths.root) == 0o711
    assert mode(paths.root / "apps") == 0o711
    assert mode(paths.run_dir) == 0o711
    assert mode(paths.registry_dir) == 0o700
    assert mode(paths.uploads_dir) == 0o700
    os.chmod(paths.uploads_dir, 0o777)
    paths.ensure()  # idempotent, and repairs a loosened mode
    assert mode(paths.uploads_dir) == 0o700


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    expected = Path("/var/lib/dockyard") if os.geteuid() == 0 else tmp_path / "dockyard"
    assert default_data_dir() == expected


def test_app_names_follow_the_dns_label_rule() -> None:
    for good in ("a", "shop", "my-shop-2", "0", "a" * 63):
        assert validate_app_name(good) == good
    for bad in ("-shop", "shop-", "my_shop", "Shop", "a" * 64, "shop.x", "", "é"):
        with pytest.raises(InvalidArgument) as caught:
            validate_app_name(bad)
        assert str(caught.value) == (
            f"invalid app name {bad!r}: use 1 to 63 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )


# Store: the file itself


def test_store_file_is_private_wal_and_versioned(store: NodeStore, db_path: Path) -> None:
    store.ensure_app("shop")  # a write, so the -wal file exists
    assert mode(db_path) == 0o600
    for suffix in ("-wal", "-shm"):
        assert mode(db_path.with_name(db_path.name + suffix)) == 0o600
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    assert store.get_meta("schema_version") == "1"


def test_a_store_from_a_newer_dockyard_is_refused(db_path: Path) -> None:
    store = NodeStore(db_path)
    store.set_meta("schema_version", "99")
    store.close()
    with pytest.raises(DockyardError, match=r"schema version 99, written by a newer dockyard"):
        NodeStore(db_path)


def test_a_file_that_is_not_a_database_gives_a_clear_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DockyardError, match=r"cannot be read .*restore it from a backup"):
        NodeStore(db_path)


def test_meta(store: NodeStore) -> None:
    assert store.get_meta("owner") is None
    store.set_meta("owner", "node-1")
    store.set_meta("owner", "node-2")
    assert store.get_meta("owner") == "node-2"


# Apps


def test_apps_get_increasing_uids_never_reused(store: NodeStore, clock: Clock) -> None:
    shop = store.ensure_app("shop")
    assert (shop.name, shop.uid, shop.created_at, shop.active_version) == (
        "shop",
        61000,
        clock.now,
        None,
    )
    clock.now += 5
    assert store.ensure_app("shop") == shop  # get, not create
    assert store.ensure_app("blog").uid == 61001
    store.delete_app("shop")
    assert store.get_app("shop") is None
    assert store.ensure_app("shop").uid == 61002
    assert [a.name for a in store.list_apps()] == ["blog", "shop"]
    with pytest.raises(InvalidArgument, match="invalid app name 'Bad_Name'"):
        store.ensure_app("Bad_Name")


def test_two_stores_on_one_file_never_share_a_uid(store: NodeStore, db_path: Path) -> None:
    other = NodeStore(db_path)
    try:
        uids = {
            store.ensure_app("a").uid,
            other.ensure_app("b").uid,
            store.ensure_app("c").uid,
            other.ensure_app("d").uid,
        }
    finally:
        other.close()
    assert uids == {61000, 61001, 61002, 61003}


def test_delete_app_forgets_everything_of_it(store: NodeStore, clock: Clock) -> None:
    add(store, "shop")
    add(store, "blog")
    store.set_active_version("shop", 1)
    store.put_secret("shop", "TOKEN", b"cipher")
    store.begin_deploy("shop", "d1", ttl=60)
    store.save_rollout(rollout("shop", clock))
    store.delete_app("shop")
    assert store.get_app("shop") is None
    assert store.list_versions("shop") == []
    assert store.secret_names("shop") == []
    assert store.get_rollout("shop") is None
    assert store.get_deploy("shop", "d1") is None
    store.begin_deploy("shop", "d2", ttl=60)  # the lock went too
    assert store.referenced_images() == {f"blog/web@{DIGEST_A}"}
    store.delete_app("nothing-here")  # unknown: a no-op


# Versions


def test_versions_are_numbered_and_kept_as_given(store: NodeStore, clock: Clock) -> None:
    first = add(store)
    clock.now += 10
    second = add(store, images={"Web": f"shop/web@{DIGEST_B}"}, message="second", rollout="none")
    assert (first.number, second.number) == (1, 2)
    assert store.get_app("shop") is not None  # add_version made the app
    got = store.get_version("shop", 1)
    assert got == first
    assert got is not None
    assert got.images == {"Web": f"shop/web@{DIGEST_A}"}
    assert got.vars == {"MODE": "prod", "LIMITS": [1, 2]}
    assert got.secret_names == ["API_KEY", "TOKEN"]
    assert got.config["routes"] == ["shop.example"]
    assert (got.bundle_hash, got.message, got.rollout, got.created_at) == (
        HASH,
        "first",
        "gradual",
        clock.now - 10,
    )
    assert [v.number for v in store.list_versions("shop")] == [2, 1]
    assert store.get_version("shop", 3) is None
    assert store.list_versions("nobody") == []
    with pytest.raises(InvalidArgument, match="rollout must be one of gradual, immediate, none"):
        add(store, rollout="sideways")


def test_active_version(store: NodeStore) -> None:
    add(store)
    add(store)
    store.set_active_version("shop", 2)
    app = store.get_app("shop")
    assert app is not None and app.active_version == 2
    store.set_active_version("shop", 1)
    app = store.get_app("shop")
    assert app is not None and app.active_version == 1
    with pytest.raises(InvalidArgument, match="app 'shop' has no version 3"):
        store.set_active_version("shop", 3)
    with pytest.raises(InvalidArgument, match="app 'ghost' has no version 1"):
        store.set_active_version("ghost", 1)


def test_referenced_images_name_every_version_of_every_app(store: NodeStore) -> None:
    add(store, "shop", images={"Web": f"shop/web@{DIGEST_A}", "Db": f"shop/db@{DIGEST_A}"})
    add(store, "shop", images={"Web": f"shop/web@{DIGEST_B}"})
    add(store, "blog", images={})
    add(store, "blog", images={"Web": f"blog/web@{DIGEST_B}"})
    assert store.referenced_images() == {
        f"shop/web@{DIGEST_A}",
        f"shop/db@{DIGEST_A}",
        f"shop/web@{DIGEST_B}",
        f"blog/web@{DIGEST_B}",
    }


def test_a_failed_write_leaves_nothing_behind(store: NodeStore) -> None:
    with pytest.raises(TypeError):
        add(store, "shop", vars={"bad": object()})  # not JSON: fails mid-transaction
    # add_version creates the app in the same transaction: rolled back with it.
    assert store.get_app("shop") is None
    assert store.list_versions("shop") == []
    assert add(store, "shop").number == 1


# Secrets


def test_secret_rows(store: NodeStore) -> None:
    store.put_secret("shop", "TOKEN", b"one")
    store.put_secret("shop", "API_KEY", b"two")
    store.put_secret("shop", "TOKEN", b"three")
    store.put_secret("blog", "TOKEN", b"four")
    assert store.get_app("shop") is not None  # secrets may come before the first deploy
    assert store.secret_names("shop") == ["API_KEY", "TOKEN"]
    assert store.secret_ciphertexts("shop") == {"TOKEN": b"three", "API_KEY": b"two"}
    assert store.delete_secret("shop", "TOKEN") is True
    assert store.delete_secret("shop", "TOKEN") is False
    assert store.secret_names("shop") == ["API_KEY"]
    assert store.secret_names("blog") == ["TOKEN"]
    with pytest.raises(InvalidArgument, match="invalid secret name"):
        store.put_secret("shop", "", b"x")


def test_secrets_are_encrypted_at_rest(tmp_path: Path, store: NodeStore, db_path: Path) -> None:
    box = SecretBox(tmp_path / "secret.key")
    plaintext = "hunter2-correct-horse-battery-staple"
    store.put_secret("shop", "PASSWORD", box.encrypt(plaintext))
    assert box.decrypt(store.secret_ciphertexts("shop")["PASSWORD"]) == plaintext
    on_disk = b"".join(
        path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("node.db")
    )
    assert b"PASSWORD" in on_disk  # the rows are there...
    assert plaintext.encode() not in on_disk  # ...but never the value


def test_secret_key_is_made_once_private_and_on_first_use(tmp_path: Path) -> None:
    key = tmp_path / "data" / "secret.key"
    box = SecretBox(key)
    assert not key.exists()  # constructing touches nothing
    sealed = box.encrypt("value")
    assert mode(key) == 0o600
    assert sorted(p.name for p in key.parent.iterdir()) == ["secret.key"]  # no temp left
    content = key.read_bytes()
    # Another box (a restarted node) uses the same key, and does not rewrite it.
    assert SecretBox(key).decrypt(sealed) == "value"
    assert key.read_bytes() == content


def test_corrupt_key_is_a_clear_error_that_names_the_file(tmp_path: Path) -> None:
    key = tmp_path / "secret.key"
    key.write_bytes(b"not-a-fernet-key\n")
    with pytest.raises(DockyardError) as caught:
        SecretBox(key).encrypt("hunter2")
    message = str(caught.value)
    assert str(key) in message and "is not a valid key" in message
    assert "hunter2" not in message and "not-a-fernet-key" not in message


def test_a_replaced_key_cannot_decrypt_and_says_so(tmp_path: Path) -> None:
    key = tmp_path / "secret.key"
    sealed = SecretBox(key).encrypt("hunter2")
    key.unlink()
    with pytest.raises(DockyardError) as caught:
        SecretBox(key).decrypt(sealed)  # made a new key: the old ciphertext is foreign
    message = str(caught.value)
    assert f"cannot decrypt a stored secret with the key in {key}" in message
    assert "hunter2" not in message and sealed.decode() not in message
    with pytest.raises(DockyardError, match="the secret is corrupt"):
        SecretBox(key).decrypt(b"garbage")


# Deploy locks


def test_a_second_deploy_conflicts_until_the_first_ends(store: NodeStore, clock: Clock) -> None:
    store.begin_deploy("shop", "d1", ttl=900)
    with pytest.raises(DeployConflict, match="another deploy of shop is in progress") as caught:
        store.begin_deploy("shop", "d2", ttl=900)
    assert caught.value.status == 409
    assert isinstance(caught.value, DockyardError)
    assert caught.value.public == str(caught.value)  # safe to show as it is
    store.begin_deploy("blog", "d3", ttl=900)  # locks are per app
    assert store.get_deploy("shop", "d1") == {
        "id": "d1",
        "app": "shop",
        "started_at": clock.now,
        "expires_at": clock.now + 900,
    }
    assert store.get_deploy("shop", "d2") is None
    assert store.get_deploy("blog", "d1") is None
    store.end_deploy("shop", "d2")  # not the holder: no effect
    with pytest.raises(DeployConflict):
        store.begin_deploy("shop", "d2", ttl=900)
    store.end_deploy("shop", "d1")
    assert store.get_deploy("shop", "d1") is None
    store.begin_deploy("shop", "d2", ttl=900)
    assert store.get_deploy("shop", "d2") is not None


def test_an_expired_deploy_lock_is_taken_over(store: NodeStore, clock: Clock) -> None:
    store.begin_deploy("shop", "d1", ttl=60)
    clock.now += 59
    with pytest.raises(DeployConflict, match="in 1 s"):
        store.begin_deploy("shop", "d2", ttl=60)
    clock.now += 1
    assert store.get_deploy("shop", "d1") is None  # expired: no longer its holder's
    store.begin_deploy("shop", "d2", ttl=60)
    assert store.get_deploy("shop", "d2") is not None
    store.end_deploy("shop", "d1")  # the late first deploy cannot free d2's lock
    assert store.get_deploy("shop", "d2") is not None


def test_beginning_again_renews_the_lock(store: NodeStore, clock: Clock) -> None:
    store.begin_deploy("shop", "d1", ttl=60)
    started = clock.now
    clock.now += 50
    store.begin_deploy("shop", "d1", ttl=60)
    assert store.get_deploy("shop", "d1") == {
        "id": "d1",
        "app": "shop",
        "started_at": started,
        "expires_at": clock.now + 60,
    }


# Rollouts


def rollout(app: str, clock: Clock, **changes: object) -> RolloutRecord:
    record = RolloutRecord(
        app=app,
        version=2,
        from_version=1,
        state="running",
        steps=[10, 50, 100],
        step=0,
        replaced=[],
        total=4,
        started_at=clock.now,
        updated_at=clock.now,
        error=None,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_rollouts_one_per_app(store: NodeStore, clock: Clock) -> None:
    assert store.get_rollout("shop") is None
    record = rollout("shop", clock)
    store.save_rollout(record)
    assert store.get_rollout("shop") == record
    record.step = 1
    record.replaced = ["Web/abc"]
    record.updated_at = clock.now + 3
    store.save_rollout(record)
    assert store.get_rollout("shop") == record
    store.save_rollout(rollout("blog", clock, from_version=None, state="done"))
    store.save_rollout(rollout("wiki", clock))
    assert [r.app for r in store.running_rollouts()] == ["shop", "wiki"]
    record.state = "failed"
    record.error = "image missing"
    store.save_rollout(record)
    assert [r.app for r in store.running_rollouts()] == ["wiki"]
    assert store.get_rollout("shop") == record
    with pytest.raises(InvalidArgument, match="rollout state must be one of"):
        store.save_rollout(rollout("shop", clock, state="paused"))


# Tokens


def test_token_format_and_hash() -> None:
    token = new_token()
    assert re.fullmatch(r"dy_[A-Za-z0-9_-]{43}", token)
    assert new_token() != token
    assert re.fullmatch(r"[0-9a-f]{64}", hash_token(token))
    assert hash_token(token) == hash_token(token) != hash_token(new_token())


def test_first_start_makes_one_token_shown_once(store: NodeStore, db_path: Path) -> None:
    tokens = Tokens(store)
    first = tokens.first_start(None)
    assert first is not None
    assert tokens.scope(first) == "admin"
    assert tokens.first_start(None) is None  # tokens exist: nothing new to show
    assert tokens.scope("dy_" + "x" * 43) is None
    assert tokens.scope("") is None
    assert (
        first.encode() not in db_path.read_bytes() + db_path.with_name("node.db-wal").read_bytes()
    )


def test_an_operator_token_from_the_environment(store: NodeStore) -> None:
    tokens = Tokens(store)
    given = "operator-chosen-token-1234"
    assert tokens.first_start(given) is None
    assert tokens.scope(given) == "admin"
    assert tokens.first_start(given) is None  # every start: idempotent
    with pytest.raises(DockyardError, match="at least 16 printable characters"):
        tokens.first_start("short")


def test_rotate_invalidates_every_old_token(store: NodeStore) -> None:
    tokens = Tokens(store)
    first = tokens.first_start(None)
    assert first is not None
    tokens.first_start("operator-chosen-token-1234")
    store.add_token(hash_token("a-read-only-token-xyz"), "read")
    assert tokens.scope("a-read-only-token-xyz") == "read"
    new = tokens.rotate()
    assert new != first
    assert tokens.scope(new) == "admin"
    for old in (first, "operator-chosen-token-1234", "a-read-only-token-xyz"):
        assert tokens.scope(old) is None


def test_remove_tokens_by_scope(store: NodeStore) -> None:
    store.add_token(hash_token("admin-token-123456"), "admin")
    store.add_token(hash_token("read-token-1234567"), "read")
    store.remove_tokens("read")
    assert store.token_scope(hash_token("read-token-1234567")) is None
    assert store.token_scope(hash_token("admin-token-123456")) == "admin"
    store.remove_tokens()
    assert store.token_scope(hash_token("admin-token-123456")) is None
    with pytest.raises(InvalidArgument, match="token scope must be one of admin, read"):
        store.add_token(hash_token("x" * 20), "root")


# Everything survives a restart


def test_everything_persists_across_reopen(tmp_path: Path, db_path: Path, clock: Clock) -> None:
    box = SecretBox(tmp_path / "secret.key")
    store = NodeStore(db_path, clock=clock)
    store.set_meta("owner", "node-abc")
    add(store, "shop")
    version = add(store, "shop", message="second")
    store.set_active_version("shop", 2)
    store.put_secret("shop", "TOKEN", box.encrypt("s3cret"))
    store.begin_deploy("shop", "d1", ttl=900)
    record = rollout("shop", clock)
    store.save_rollout(record)
    token = Tokens(store).first_start(None)
    assert token is not None
    app = store.get_app("shop")
    store.close()

    reopened = NodeStore(db_path, clock=clock)
    try:
        assert reopened.get_meta("owner") == "node-abc"
        assert reopened.get_app("shop") == app
        assert reopened.list_versions("shop")[0] == version
        assert (
            SecretBox(tmp_path / "secret.key").decrypt(reopened.secret_ciphertexts("shop")["TOKEN"])
            == "s3cret"
        )
        with pytest.raises(DeployConflict):
            reopened.begin_deploy("shop", "d2", ttl=900)
        assert reopened.running_rollouts() == [record]
        assert Tokens(reopened).scope(token) == "admin"
        assert Tokens(reopened).first_start(None) is None
        assert reopened.ensure_app("blog").uid == 61001
        assert reopened.get_meta("schema_version") == "1"
    finally:
        reopened.close()
