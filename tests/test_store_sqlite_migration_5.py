"""Migration 5: history rows find their job by `seq`; a version 4 file keeps all of its history."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from service.model import JobState
from service.store.schema import MIGRATIONS
from service.store.sqlite import SQLiteStore
from service.store.sqlite_sql import TRANSITION_INSERT, history_row
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

_V4_HISTORY = [
    ("job_a", None, "received", 10.0),
    ("job_b", None, "received", 11.0),
    ("job_a", "received", "mapped", 12.0),
    ("job_a", "mapped", "submitted", 13.0),
]


def write_version_4_file(path) -> None:
    """A file as version 4 left it: one event, two jobs, history keyed by job id."""
    db = sqlite3.connect(path)
    for statements in MIGRATIONS[:4]:
        for statement in statements:
            db.execute(statement)
    db.execute("PRAGMA user_version = 4")
    db.execute(
        "INSERT INTO events (id, source, dedupe_key, event_id, event_type, body, headers,"
        " received_at, status) VALUES (1, 'shop', 'k', 'e', 't', x'7b7d', '{}', 10, 'routed')"
    )
    for seq, job_id in ((7, "job_a"), (9, "job_b")):
        db.execute(
            "INSERT INTO jobs (seq, job_id, event_row, source, route, state, export_name,"
            " created_at, updated_at) VALUES (?, ?, 1, 'shop', 'r', 'received', 'n', 10, 10)",
            (seq, job_id),
        )
    db.executemany(
        "INSERT INTO transitions (job_id, from_state, to_state, at) VALUES (?, ?, ?, ?)",
        _V4_HISTORY,
    )
    db.commit()
    db.close()


@asynccontextmanager
async def migrated(path) -> AsyncIterator[SQLiteStore]:
    """A version 4 file at `path`, opened (so migrated) by the store."""
    write_version_4_file(path)
    store = SQLiteStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_a_version_4_file_keeps_every_history_row_in_order(tmp_path):
    path = tmp_path / "old.db"
    async with migrated(path) as store:
        history_a = await store.job_history("job_a")
        history_b = await store.job_history("job_b")
        exports = await store.exports_by_route(0.0)
    assert [(t.job_id, t.from_state, t.to_state, t.at) for t in history_a] == [
        ("job_a", None, JobState.RECEIVED, 10.0),
        ("job_a", JobState.RECEIVED, JobState.MAPPED, 12.0),
        ("job_a", JobState.MAPPED, JobState.SUBMITTED, 13.0),
    ]
    assert [(t.job_id, t.to_state) for t in history_b] == [("job_b", JobState.RECEIVED)]
    assert exports == {"r": 1}
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        indexed = [r[2] for r in raw.execute("PRAGMA index_info(transitions_job)")]
        assert indexed == ["job_seq", "id"]
        assert raw.execute("SELECT job_seq FROM transitions WHERE job_id = 'job_b'").fetchall() == [
            (9,)
        ]
    finally:
        raw.close()


async def test_after_the_migration_new_jobs_and_moves_are_recorded_against_their_seq(tmp_path):
    path = tmp_path / "old.db"
    async with migrated(path) as store:
        event = sample_event("new")
        job = sample_job(event)
        await store.accept_event(event, [job])
        await store.transition(job.job_id, {JobState.RECEIVED}, JobState.MAPPED)
        history = await store.job_history(job.job_id)
    assert [(t.from_state, t.to_state) for t in history] == [
        (None, JobState.RECEIVED),
        (JobState.RECEIVED, JobState.MAPPED),
    ]
    raw = sqlite3.connect(path)
    try:
        (seq,) = raw.execute("SELECT seq FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        rows = raw.execute("SELECT job_seq FROM transitions WHERE job_id = ?", (job.job_id,))
        assert [r[0] for r in rows] == [seq, seq]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        raw.close()


async def test_a_history_row_for_a_job_that_does_not_exist_is_refused(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    row = history_row(("job_nope", None, "mapped", 1.0, None))
    try:
        with pytest.raises(sqlite3.IntegrityError, match="job_seq"):
            await store._write(lambda conn: conn.execute(TRANSITION_INSERT, row))
        assert await store.job_history("job_nope") == []
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (
            "UPDATE jobs SET lease_until = 1 WHERE owner = ? AND lease_until IS NOT NULL",
            "jobs_owner",
        ),
        ("SELECT job_id FROM jobs WHERE render_key = ? AND ready_at >= 0", "jobs_render_key"),
        ("SELECT job_id FROM jobs WHERE coalesce_key = ? ORDER BY seq", "jobs_coalesce_key"),
    ],
)
async def test_the_indexes_that_leave_nulls_out_still_serve_lookups_by_value(
    tmp_path, query, index
):
    path = tmp_path / "old.db"
    async with migrated(path):
        pass
    raw = sqlite3.connect(path)
    try:
        plan = " ".join(r[3] for r in raw.execute(f"EXPLAIN QUERY PLAN {query}", ("x",)))
        (definition,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,))
    finally:
        raw.close()
    assert f"USING INDEX {index}" in plan
    assert "IS NOT NULL" in definition[0]


async def test_a_file_with_history_of_missing_jobs_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "old.db"
    write_version_4_file(path)
    db = sqlite3.connect(path)  # foreign keys off, as in an operator's sqlite3 shell
    db.execute("DELETE FROM jobs WHERE job_id = 'job_b'")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    with pytest.raises(Exception, match="1 history rows name jobs that do not exist"):
        await store.open()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 4
        assert raw.execute("SELECT COUNT(*) FROM transitions").fetchone()[0] == len(_V4_HISTORY)
    finally:
        raw.close()
