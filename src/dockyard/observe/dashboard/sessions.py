"""Server-side sessions for the dashboard: a random id in an HttpOnly, SameSite=Strict
cookie, and everything else (whether it logged in, its CSRF token, its expiry) kept here.

A visitor gets an anonymous session on the login page so that the login form carries a
CSRF token like every other form; logging in replaces it with a fresh id (a session id
seen before login is never trusted after it).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Session", "Sessions"]


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    authenticated: bool
    expires_at: float

    def csrf_matches(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class Sessions:
    """At most `limit` anonymous and `limit` logged-in sessions live at once; the oldest
    of the same kind go first when a new one needs room. Kept apart so that a stream of
    anonymous visitors can neither grow memory nor push out anyone who logged in."""

    def __init__(
        self,
        *,
        lifetime: float = 8 * 3600,
        anonymous_lifetime: float = 3600,
        limit: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime
        self.anonymous_lifetime = anonymous_lifetime
        self.limit = limit
        self._clock = clock
        # dicts keep insertion order: the first keys are the oldest sessions.
        self._kinds: dict[bool, dict[str, Session]] = {True: {}, False: {}}

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        for sessions in self._kinds.values():
            session = sessions.get(session_id)
            if session is None:
                continue
            if session.expires_at <= self._clock():
                del sessions[session_id]
                return None
            return session
        return None

    def create(self, *, authenticated: bool) -> Session:
        sessions = self._kinds[authenticated]
        now = self._clock()
        for sid in [sid for sid, s in sessions.items() if s.expires_at <= now]:
            del sessions[sid]
        while len(sessions) >= self.limit:
            del sessions[next(iter(sessions))]
        lifetime = self.lifetime if authenticated else self.anonymous_lifetime
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            authenticated=authenticated,
            expires_at=now + lifetime,
        )
        sessions[session.id] = session
        return session

    def end(self, session_id: str) -> None:
        for sessions in self._kinds.values():
            sessions.pop(session_id, None)

    def end_all(self) -> None:
        """Everyone logs in again (e.g. after the admin token was rotated)."""
        for sessions in self._kinds.values():
            sessions.clear()

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._kinds.values())
