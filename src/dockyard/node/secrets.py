"""App secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) under a key file of the node's.

The store only ever holds ciphertext; the key lives beside it in ``secret.key`` (0600), so
a copy of the database alone (a backup, a bug report) reveals no secret. The key is made
on first use, not at construction, so building a ``SecretBox`` never touches the disk.
Errors name the key file and say what to do; they never carry a secret or ciphertext.
"""

from __future__ import annotations

import contextlib
import os
import secrets as random
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from ..errors import DockyardError

__all__ = ["SecretBox"]


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        self.key_path = Path(key_path)
        self._fernet: Fernet | None = None

    def encrypt(self, plaintext: str) -> bytes:
        return self._key().encrypt(plaintext.encode("utf-8"))

    def decrypt(self, ciphertext: bytes) -> str:
        try:
            return self._key().decrypt(ciphertext).decode("utf-8")
        except (InvalidToken, UnicodeDecodeError):
            raise DockyardError(
                f"cannot decrypt a stored secret with the key in {self.key_path}: the key file "
                "was replaced or the secret is corrupt; restore the original key file, or put "
                "the secret again (dockyard secret put)"
            ) from None

    def _key(self) -> Fernet:
        if self._fernet is None:
            self._fernet = self._load()
        return self._fernet

    def _load(self) -> Fernet:
        try:
            raw = self.key_path.read_bytes()
        except FileNotFoundError:
            raw = self._create()
        except OSError as exc:
            raise DockyardError(
                f"cannot read the secret key {self.key_path}: {exc.strerror}"
            ) from None
        try:
            return Fernet(raw.strip())
        except (ValueError, TypeError):
            # Never echo the file's content: it may be a key that was merely mangled.
            raise DockyardError(
                f"the secret key {self.key_path} is not a valid key (expected 32 url-safe "
                "base64-encoded bytes); restore it from a backup. Moving it away makes a new "
                "key, after which every stored secret must be put again"
            ) from None

    def _create(self) -> bytes:
        """Write a new key atomically: to a private temporary file, then hard-link it into
        place, which fails if another process made the key first (then theirs is used).
        A reader therefore never sees a half-written or world-readable key."""
        key = Fernet.generate_key()
        self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = self.key_path.with_name(f".{self.key_path.name}.{random.token_hex(6)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
                os.write(fd, key + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, self.key_path)
            except FileExistsError:
                return self.key_path.read_bytes()
            _fsync_dir(self.key_path.parent)
            return key
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
