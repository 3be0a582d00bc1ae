"""A PostgreSQL session-level advisory lock on a connection of its own (the MQTT reader's).

The lock lives exactly as long as the session that took it. A holder killed with `kill -9`
closes its socket, and the server frees the lock at once (measured on PostgreSQL 15 on
loopback: within 10 ms). A holder that goes silent without closing its socket (process frozen,
machine gone, network cut) would keep it for as long as TCP keeps the socket open, so the
session sets `idle_session_timeout` to `lapse_s`: a live holder runs a check query every
second or so, and the server ends a session that stayed idle longer (measured: a holder frozen
with SIGSTOP lost the lock 3.0 s after it stopped, with a 3 s lapse; its next query on resume
failed). Servers older than 14 lack that setting: there a frozen holder keeps the lock until
its socket dies.
"""

from __future__ import annotations

import contextlib
import hashlib

import psycopg
from psycopg import AsyncConnection

from service.log import get_logger
from service.store.base import LockLostError, StoreUnavailableError

_log = get_logger("store.postgres")
_IDLE_SESSION_TIMEOUT_SINCE = 140000
"""`server_version` from which PostgreSQL has `idle_session_timeout`."""


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory lock key of a lock name (same on every instance)."""
    digest = hashlib.blake2b(f"studiohook:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresSessionLock:
    """`pg_try_advisory_lock` kept on a dedicated connection; see the module docstring.

    The pool is never used: a session lock taken on a pooled connection would go back to the
    pool with it. Letting go closes the connection, which frees the lock whatever state the
    session was in.
    """

    def __init__(self, url: str, name: str, *, lapse_s: float, connect_timeout_s: float) -> None:
        self._url = url
        self._name = name
        self._key = advisory_key(name)
        self._lapse_ms = max(1, round(lapse_s * 1000))
        self._connect_timeout_s = max(1, round(connect_timeout_s))
        self._conn: AsyncConnection[tuple[object, ...]] | None = None
        self._held = False

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; the connection is kept for the next try either way."""
        if self._held:
            return True
        try:
            conn = await self._connection()
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
            row = await cur.fetchone()
        except psycopg.Error as exc:
            await self.release()
            raise StoreUnavailableError(f"cannot try lock {self._name!r}: {exc}") from exc
        self._held = bool(row and row[0])
        return self._held

    async def check(self) -> None:
        """A query on the holding session: it answers only while the session, so the lock, lives."""
        conn = self._conn
        if conn is None or not self._held:
            raise LockLostError(f"lock {self._name!r} is not held")
        try:
            await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            await self.release()
            raise LockLostError(f"lock {self._name!r} lost with its connection: {exc}") from exc

    async def release(self) -> None:
        """Unlock, then close the connection; the lock is free when this returns.

        Closing alone frees a session lock only once the server's backend has exited, a moment
        after the close: another session trying at once could still find it held.
        """
        conn, held, self._conn, self._held = self._conn, self._held, None, False
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error):
            if held and not conn.closed:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        with contextlib.suppress(psycopg.Error):
            await conn.close()

    async def _connection(self) -> AsyncConnection[tuple[object, ...]]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = await AsyncConnection.connect(
            self._url,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            application_name=f"studiohook {self._name}"[:63],
        )
        if conn.info.server_version >= _IDLE_SESSION_TIMEOUT_SINCE:
            await conn.execute(
                "SELECT set_config('idle_session_timeout', %s, false)", (str(self._lapse_ms),)
            )
        else:
            _log.warning(
                "store.lock_without_lapse",
                lock=self._name,
                reason="PostgreSQL < 14 has no idle_session_timeout: a frozen holder keeps it",
            )
        self._conn = conn
        return conn
