"""Console sessions and CSRF tokens: signed, bound, expiring, and useless to anyone else."""

from __future__ import annotations

from service.console.auth import SESSION_TTL_S, ConsoleAuth


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_cookie_proves_the_login_until_it_expires():
    clock = Clock()
    auth = ConsoleAuth("admin-token", clock)
    cookie, principal = auth.new_session()
    assert auth.session(cookie) == principal
    assert principal.expires_at == clock.now + SESSION_TTL_S
    clock.now += SESSION_TTL_S - 1
    assert auth.session(cookie) == principal
    clock.now += 1
    assert auth.session(cookie) is None


def test_forged_or_foreign_cookies_prove_nothing():
    auth = ConsoleAuth("admin-token")
    cookie, _ = auth.new_session()
    issued, nonce, mac = cookie.split(".")
    assert auth.session(f"{int(issued) + 3600}.{nonce}.{mac}") is None
    assert auth.session(f"{issued}.other.{mac}") is None
    assert auth.session(cookie[:-1] + ("0" if cookie[-1] != "0" else "1")) is None
    assert auth.session("") is None
    assert auth.session("garbage") is None
    assert ConsoleAuth("rotated-token").session(cookie) is None


def test_csrf_tokens_are_bound_to_their_session():
    auth = ConsoleAuth("admin-token")
    _, mine = auth.new_session()
    _, theirs = auth.new_session()
    token = auth.csrf_token(mine)
    assert auth.csrf_ok(mine, token)
    assert not auth.csrf_ok(theirs, token)
    assert not auth.csrf_ok(mine, None)
    assert not auth.csrf_ok(mine, "")
    assert token not in {"admin-token", mine.nonce}


def test_bearer_header_needs_the_exact_token():
    auth = ConsoleAuth("admin-token")
    assert auth.bearer("Bearer admin-token") is not None
    assert auth.bearer("Bearer admin-tokenx") is None
    assert auth.bearer("admin-token") is None
    assert auth.bearer(None) is None


def test_login_form_token_is_bound_to_the_browsers_pre_login_cookie():
    auth = ConsoleAuth("admin-token")
    nonce = ConsoleAuth.new_login_nonce()
    token = auth.login_csrf_token(nonce)
    assert auth.login_csrf_ok(nonce, token)
    assert not auth.login_csrf_ok(ConsoleAuth.new_login_nonce(), token)
    assert not auth.login_csrf_ok(None, token)
    assert not auth.login_csrf_ok(nonce, None)
