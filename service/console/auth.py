"""Who may use the console: the admin token, a signed session cookie, and CSRF tokens.

The session is stateless: the cookie carries its issue time and a random nonce, signed with a
key derived from `admin_token`. Nothing is kept in memory, a restart does not log anyone out,
and changing the token logs everyone out. Every POST carries a CSRF token bound to the
session's nonce (the login form's to a pre-login cookie), so another site can neither act
with an operator's cookie nor log a browser into its own session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "studiohook_session"
LOGIN_COOKIE = "studiohook_login"
SESSION_TTL_S = 12 * 3600
_BEARER_NONCE = "bearer"
"""A request that sends the token itself has no cookie: its CSRF token is bound to this."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated request: how it proved itself, and the nonce its CSRF token binds."""

    nonce: str
    via: str
    expires_at: float | None = None
    """When a session ends (live streams stop then too); None for the bearer token."""


class ConsoleAuth:
    """Issues and checks sessions and CSRF tokens for one admin token."""

    def __init__(self, admin_token: str, clock: Callable[[], float] = time.time) -> None:
        self._token = admin_token.encode()
        self._key = hmac.new(self._token, b"studiohook console v1", hashlib.sha256).digest()
        self._clock = clock

    def _mac(self, purpose: str, value: str) -> str:
        message = f"{purpose}\x00{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison with the admin token."""
        return hmac.compare_digest(given.encode(), self._token)

    def new_session(self) -> tuple[str, Principal]:
        """A cookie value for a fresh login, and who it makes the browser."""
        nonce = secrets.token_urlsafe(16)
        issued = int(self._clock())
        body = f"{issued}.{nonce}"
        principal = Principal(nonce, "session", issued + SESSION_TTL_S)
        return f"{body}.{self._mac('session', body)}", principal

    def session(self, cookie: str | None) -> Principal | None:
        """The principal a session cookie proves, or None (forged, expired, malformed)."""
        if not cookie:
            return None
        body, _, mac = cookie.rpartition(".")
        issued_text, _, nonce = body.partition(".")
        if not nonce or not issued_text.isdigit():
            return None
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        if not 0 <= self._clock() - int(issued_text) < SESSION_TTL_S:
            return None
        return Principal(nonce, "session", int(issued_text) + SESSION_TTL_S)

    def bearer(self, header: str | None) -> Principal | None:
        """The principal an `Authorization: Bearer <admin_token>` header proves, or None."""
        if not header or not header.startswith("Bearer "):
            return None
        if not self.token_matches(header.removeprefix("Bearer ").strip()):
            return None
        return Principal(_BEARER_NONCE, "bearer")

    def csrf_token(self, principal: Principal) -> str:
        """The token every form of this principal's pages carries."""
        return self._mac("csrf", principal.nonce)

    def csrf_ok(self, principal: Principal, given: str | None) -> bool:
        """Whether a POST carries this principal's CSRF token."""
        return bool(given) and hmac.compare_digest(str(given), self.csrf_token(principal))

    @staticmethod
    def new_login_nonce() -> str:
        """The pre-login cookie's value: binds the login form's CSRF token to this browser."""
        return secrets.token_urlsafe(16)

    def login_csrf_token(self, login_nonce: str) -> str:
        """The login form's CSRF token for the browser holding `login_nonce`."""
        return self._mac("login", login_nonce)

    def login_csrf_ok(self, login_nonce: str | None, given: str | None) -> bool:
        """Whether a login POST comes from our own form in the same browser."""
        if not login_nonce or not given:
            return False
        return hmac.compare_digest(given, self.login_csrf_token(login_nonce))
