"""Read-only SQL for the operator console: listings and aggregates no work loop needs.

Kept apart from `sqlite_sql.py` (the reads and writes the pipeline depends on) so the console
can grow without touching the code paths that move money. Every function runs on a read-only
connection; timestamps are epoch seconds passed in by the caller.
"""

from __future__ import annotations

import sqlite3

from service.model import (
    Announcement,
    EventStatus,
    Job,
    JobState,
    MinuteActivity,
    OutboxMessage,
)
from service.store.sqlite_sql import JOB_COLUMNS, job_from_row

_JOB_SELECT = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"  # noqa: S608 - names come from the Job dataclass
_MINUTE_S = 60


def waiting_of_key(conn: sqlite3.Connection, coalesce_key: str) -> list[Job]:
    """The `mapped`/`held` jobs of one coalesce key, oldest first: what a new one supersedes."""
    rows = conn.execute(
        f"{_JOB_SELECT} WHERE coalesce_key = ? AND state IN (?, ?) ORDER BY seq",
        (coalesce_key, JobState.MAPPED.value, JobState.HELD.value),
    )
    return [job_from_row(r) for r in rows.fetchall()]


def count_events_by_status(conn: sqlite3.Connection) -> dict[EventStatus, int]:
    """Every status with its count, zero included."""
    counts = dict.fromkeys(EventStatus, 0)
    for row in conn.execute("SELECT status, COUNT(*) AS n FROM events GROUP BY status"):
        counts[EventStatus(row["status"])] = row["n"]
    return counts


def jobs_of_event(conn: sqlite3.Connection, event_row: int) -> list[Job]:
    """The jobs one inbox row became, in the order they were created."""
    rows = conn.execute(f"{_JOB_SELECT} WHERE event_row = ? ORDER BY seq", (event_row,))
    return [job_from_row(r) for r in rows.fetchall()]


def job_announcements(conn: sqlite3.Connection, job_id: str) -> list[Announcement]:
    """Every outbox row of one job, every round and target, oldest first."""
    rows = conn.execute(
        "SELECT id, job_id, target, event_type, payload, attempts, next_attempt_at, status,"
        " last_error, export_name, created_at, delivered_at FROM outbox WHERE job_id = ?"
        " ORDER BY id",
        (job_id,),
    ).fetchall()
    return [
        Announcement(
            message=OutboxMessage(
                id=r["id"],
                job_id=r["job_id"],
                target=r["target"],
                event_type=r["event_type"],
                payload=r["payload"],
                attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"],
                status=r["status"],
                last_error=r["last_error"],
                export_name=r["export_name"],
            ),
            created_at=r["created_at"],
            delivered_at=r["delivered_at"],
        )
        for r in rows
    ]


def count_outbox_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    """Outbox rows by status (`pending`, `delivered`, `dead`), zeros included."""
    counts = dict.fromkeys(("pending", "delivered", "dead"), 0)
    for row in conn.execute("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status"):
        counts[row["status"]] = row["n"]
    return counts


def activity_per_minute(conn: sqlite3.Connection, since: float) -> list[MinuteActivity]:
    """Events received and videos made ready per minute since `since`; empty minutes left out."""
    minutes: dict[int, list[int]] = {}
    for column, table, index in (("received_at", "events", 0), ("ready_at", "jobs", 1)):
        rows = conn.execute(
            f"SELECT CAST({column} / ? AS INTEGER) AS m, COUNT(*) AS n FROM {table}"  # noqa: S608 - constant names above
            f" WHERE {column} >= ? GROUP BY m",
            (_MINUTE_S, since),
        )
        for row in rows:
            minutes.setdefault(row["m"], [0, 0])[index] = row["n"]
    return [
        MinuteActivity(minute=float(m * _MINUTE_S), events=counts[0], videos=counts[1])
        for m, counts in sorted(minutes.items())
    ]


def exports_by_route(conn: sqlite3.Connection, since: float) -> dict[str, int]:
    """Exports billed since `since`, per route: one per move into `submitted`.

    Every way into `submitted` is one paid export accepted by the API (a reconciled create
    adopts the export it finds, it does not make a second one), so the history counts them.
    """
    rows = conn.execute(
        "SELECT j.route AS route, COUNT(*) AS n FROM transitions t"
        " JOIN jobs j ON j.seq = t.job_seq"
        " WHERE t.to_state = ? AND t.at >= ? GROUP BY j.route",
        (JobState.SUBMITTED.value, since),
    )
    return {row["route"]: row["n"] for row in rows}


def count_jobs_by_route(conn: sqlite3.Connection) -> dict[str, dict[JobState, int]]:
    """Jobs per route and state (only the states a route has jobs in)."""
    counts: dict[str, dict[JobState, int]] = {}
    for row in conn.execute("SELECT route, state, COUNT(*) AS n FROM jobs GROUP BY route, state"):
        counts.setdefault(row["route"], {})[JobState(row["state"])] = row["n"]
    return counts
