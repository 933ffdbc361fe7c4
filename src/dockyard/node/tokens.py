"""Admin tokens for the node's API and registry: random bearer strings, stored hashed.

A token is ``dy_`` + 43 url-safe characters (256 random bits), so a plain SHA-256 is
enough to store it: there is nothing to brute-force, unlike a password, and a leaked
database reveals no usable token. Scopes: "admin" (everything) and "read" (GET only).

On first start the node makes an admin token and prints it once; or the operator gives
one in DOCKYARD_ADMIN_TOKEN, which is (re)added on every start, so it keeps working even
after ``token rotate`` for as long as the environment sets it.
"""

from __future__ import annotations

import hashlib
import secrets

from ..errors import DockyardError
from .store import NodeStore

__all__ = ["MIN_TOKEN_LENGTH", "Tokens", "hash_token", "new_token"]

# An operator's own token must be at least this long (a generated one is 46 characters).
MIN_TOKEN_LENGTH = 16


def new_token() -> str:
    return "dy_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    def __init__(self, store: NodeStore) -> None:
        self.store = store

    def first_start(self, env_token: str | None) -> str | None:
        """Make sure some admin token works. With ``env_token`` (DOCKYARD_ADMIN_TOKEN) that
        one is added and None returned (the operator knows it). Otherwise, when the node
        has no token yet, a new admin token is returned: print it once, it is not kept.
        None when tokens already exist."""
        if env_token:
            if len(env_token) < MIN_TOKEN_LENGTH or not env_token.isprintable():
                raise DockyardError(
                    f"DOCKYARD_ADMIN_TOKEN must be at least {MIN_TOKEN_LENGTH} printable "
                    "characters (leave it unset and the node makes one for you)"
                )
            self.store.add_token(hash_token(env_token), "admin")
            return None
        if self.store.has_tokens():
            return None
        token = new_token()
        self.store.add_token(hash_token(token), "admin")
        return token

    def rotate(self) -> str:
        """Replace every token (admin and read) with one new admin token, returned once."""
        token = new_token()
        self.store.replace_tokens(hash_token(token), "admin")
        return token

    def scope(self, token: str) -> str | None:
        """ "admin", "read", or None for an unknown token (compared in constant time)."""
        if not token:
            return None
        return self.store.token_scope(hash_token(token))
