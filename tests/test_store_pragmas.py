"""The durability settings the README promises, read on the store's own writer connection.

A commit counts as acknowledged only once it is on disk: that needs WAL and synchronous=FULL
on the connection that writes. Reading them through the store's write path checks exactly that
connection, not a fresh one with its own defaults.
"""

import sqlite3

import pytest

from service.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

SYNCHRONOUS_FULL = 2


def writer_pragmas(connection):
    journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
    return journal_mode, synchronous


async def pragmas_of(path):
    store = SQLiteStore(path)
    await store.open()
    try:
        return await store._write(writer_pragmas)
    finally:
        await store.close()


async def test_the_writer_commits_in_wal_with_synchronous_full(tmp_path):
    assert await pragmas_of(tmp_path / "fresh.db") == ("wal", SYNCHRONOUS_FULL)


async def test_a_database_made_elsewhere_in_rollback_mode_is_switched_to_wal(tmp_path):
    path = tmp_path / "old.db"
    made_elsewhere = sqlite3.connect(path)
    try:
        assert made_elsewhere.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    finally:
        made_elsewhere.close()
    assert await pragmas_of(path) == ("wal", SYNCHRONOUS_FULL)


async def test_the_writer_keeps_index_pages_and_statement_journals_in_memory(tmp_path):
    """Speed settings of the writer alone: a 64 MiB page cache for the random index pages
    every delivery touches, and statement journals in memory (no temp file per commit)."""
    store = SQLiteStore(tmp_path / "fast.db")
    await store.open()
    try:
        cache_size, temp_store = await store._write(
            lambda connection: (
                connection.execute("PRAGMA cache_size").fetchone()[0],
                connection.execute("PRAGMA temp_store").fetchone()[0],
            )
        )
    finally:
        await store.close()
    assert cache_size == -64 * 1024
    assert temp_store == 2  # MEMORY
