"""The WHERE clauses of the listing queries, shared by both engines.

Only the parameter mark differs (`?` for SQLite, `%s` for psycopg), so the filters are built
once here and each engine adds its own SELECT, ORDER BY and LIMIT.
"""

from __future__ import annotations

from service.model import EventStatus, JobState

Where = tuple[str, list[object]]
"""A ` WHERE …` fragment (empty when nothing filters) and its parameters, in order."""


def _where(mark: str, equal: dict[str, object], ranges: list[tuple[str, object]]) -> Where:
    clauses: list[str] = []
    params: list[object] = []
    for column, value in equal.items():
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(str(value))
    for clause, value in ranges:
        if value is not None:
            clauses.append(clause.replace("?", mark))
            params.append(value)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def events_where(
    mark: str,
    *,
    status: EventStatus | None,
    source: str | None,
    event_id: str | None,
    since: float | None,
    cursor: int | None,
) -> Where:
    """Inbox rows by status, source, event id, receive time and a row-id cursor (newest first)."""
    return _where(
        mark,
        {"status": status, "source": source, "event_id": event_id},
        [("received_at >= ?", since), ("id < ?", cursor)],
    )


def jobs_where(
    mark: str,
    *,
    state: JobState | None,
    route: str | None,
    source: str | None,
    created_since: float | None,
    after: str | None,
) -> Where:
    """Jobs by state, route, source, creation time, continuing after job id `after`."""
    return _where(
        mark,
        {"state": state, "route": route, "source": source},
        [
            ("created_at >= ?", created_since),
            ("(created_at, seq) < (SELECT created_at, seq FROM jobs WHERE job_id = ?)", after),
        ],
    )
