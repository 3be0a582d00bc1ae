"""A read-only look into the configured store, for `studiohook preview`.

Preview must never change what the service will do: it never creates the SQLite file, never
migrates a schema and never writes a row. SQLite is opened with `mode=ro` (and `query_only`),
and `immutable` when no service has it open, so not even SQLite's side files are created;
PostgreSQL with every transaction read-only. The questions are the pipeline's own queries
(`cached_render`, `spend_counts`), so the answer is the one a job would get right now.
"""

from __future__ import annotations

import sqlite3
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row

from service.model import Job
from service.store import postgres_sql, sqlite_reads, sqlite_sql
from service.store.factory import sqlite_path
from service.store.postgres_schema import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from service.store.schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION

_CONNECT_TIMEOUT_S = 5


class StoreUnreadableError(Exception):
    """The store cannot answer: it does not exist yet, or cannot be read; the message says which."""


class StorePeek(Protocol):
    """The read-only questions preview asks about one event."""

    async def get_job(self, job_id: str) -> Job | None:
        """The job, if the service already has it (the event is a duplicate)."""

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        """The video the render cache would reuse (the pipeline's own lookup)."""

    async def waiting_of_key(self, coalesce_key: str) -> list[Job]:
        """The `mapped`/`held` jobs a new job of this key would supersede."""

    async def spend_counts(self, since: float) -> dict[str, int]:
        """Billed exports recorded since `since`, per route (what the caps count)."""


class _SQLitePeek:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def get_job(self, job_id: str) -> Job | None:
        return await anyio.to_thread.run_sync(sqlite_sql.get_job, self._connection, job_id)

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        return await anyio.to_thread.run_sync(
            sqlite_sql.cached_render, self._connection, render_key, since
        )

    async def waiting_of_key(self, coalesce_key: str) -> list[Job]:
        return await anyio.to_thread.run_sync(
            sqlite_reads.waiting_of_key, self._connection, coalesce_key
        )

    async def spend_counts(self, since: float) -> dict[str, int]:
        return await anyio.to_thread.run_sync(sqlite_sql.spend_counts, self._connection, since)


class _PostgresPeek:
    def __init__(self, connection: AsyncConnection[DictRow]) -> None:
        self._connection = connection

    async def get_job(self, job_id: str) -> Job | None:
        return await postgres_sql.get_job(self._connection, job_id=job_id)

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        return await postgres_sql.cached_render(
            self._connection, render_key=render_key, since=since
        )

    async def waiting_of_key(self, coalesce_key: str) -> list[Job]:
        return await postgres_sql.waiting_of_key(self._connection, coalesce_key=coalesce_key)

    async def spend_counts(self, since: float) -> dict[str, int]:
        return await postgres_sql.spend_counts(self._connection, since=since)


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing file whose schema this code reads."""
    if not path.is_file():
        raise StoreUnreadableError(
            f"the store {path} does not exist yet (the service has not run with this config)"
        )
    uri = f"file:{urllib.request.pathname2url(str(path))}?mode=ro"
    if not path.with_name(f"{path.name}-wal").exists():
        # No process has the file open in WAL mode: read it as it is, creating no -wal/-shm
        # side files (made by this user, they could lock out a service run by another).
        uri += "&immutable=1"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA query_only=ON")
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise StoreUnreadableError(f"cannot read the store {path}: {exc}") from exc
    if version != SQLITE_SCHEMA_VERSION:
        connection.close()
        raise StoreUnreadableError(_version_problem(str(path), version, SQLITE_SCHEMA_VERSION))
    return connection


def _version_problem(where: str, found: int, expected: int) -> str:
    if found > expected:
        return f"the store {where} has schema version {found}, newer than this studiohook knows"
    return (
        f"the store {where} has schema version {found}, this studiohook reads {expected}:"
        " start the service once to migrate it"
    )


@asynccontextmanager
async def _sqlite_peek(path: Path) -> AsyncIterator[StorePeek]:
    connection = await anyio.to_thread.run_sync(_open_sqlite, path)
    try:
        yield _SQLitePeek(connection)
    finally:
        connection.close()


@asynccontextmanager
async def _postgres_peek(url: str) -> AsyncIterator[StorePeek]:
    try:
        connection = await AsyncConnection.connect(
            url, row_factory=dict_row, connect_timeout=_CONNECT_TIMEOUT_S
        )
    except psycopg.Error as exc:
        raise StoreUnreadableError(f"cannot read the PostgreSQL store: {exc}".strip()) from exc
    try:
        await connection.set_read_only(True)  # every transaction starts READ ONLY
        cursor = await connection.execute("SELECT to_regclass('studiohook_schema') IS NOT NULL")
        row = await cursor.fetchone()
        if row is None or not next(iter(row.values())):
            raise StoreUnreadableError(
                "the PostgreSQL store has no studiohook tables yet"
                " (the service has not run with this config)"
            )
        cursor = await connection.execute("SELECT version FROM studiohook_schema WHERE id = 1")
        row = await cursor.fetchone()
        version = int(row["version"]) if row is not None else 0
        if version != POSTGRES_SCHEMA_VERSION:
            raise StoreUnreadableError(
                _version_problem("(PostgreSQL)", version, POSTGRES_SCHEMA_VERSION)
            )
        yield _PostgresPeek(connection)
    except psycopg.Error as exc:
        raise StoreUnreadableError(f"cannot read the PostgreSQL store: {exc}".strip()) from exc
    finally:
        await connection.close()


def peek_store(url: str) -> AbstractAsyncContextManager[StorePeek]:
    """Open the store a `[store] url` names read-only; StoreUnreadableError says why not."""
    if url.startswith(("postgresql://", "postgres://")):
        return _postgres_peek(url)
    return _sqlite_peek(sqlite_path(url))
