"""PostgreSQL for the tests: one throw-away database per test run, one schema per test.

The server is the one on 127.0.0.1:5432 (trust auth, user postgres) that `scripts/ensure-postgres`
makes available; STUDIOHOOK_TEST_POSTGRES names another admin URL. The run's database gets a
unique name, is created at session start and dropped (FORCE: lingering connections of a killed
daemon included) at the end. Each test then gets a schema of its own through `search_path`, so
tests start empty without paying for a CREATE DATABASE each.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

ADMIN_URL = os.environ.get(
    "STUDIOHOOK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL does not answer at {ADMIN_URL} ({exc}); run `bash scripts/ensure-postgres`",
            pytrace=False,
        )


def database_url(name: str) -> str:
    """The admin URL pointed at database `name`."""
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def with_schema(url: str, schema: str) -> str:
    """`url` with every connection's search_path set to `schema` (libpq `options`)."""
    return f"{url}?options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of this run's fresh database."""
    name = f"studiohook_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(name)
    finally:
        with _admin() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A URL whose connections see an empty schema of this test's own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return with_schema(postgres_database, schema)
