"""The SQL of the SQLite engine: plain functions of a connection, one per store operation.

Write functions run inside the group-commit writer's transaction (and their own SAVEPOINT);
read functions run on a read-only connection. Timestamps are passed in, taken from the
store's clock on the caller's side, so tests that move a fake clock see exactly that time.
"""

from __future__ import annotations

import dataclasses
import functools
import sqlite3
from collections.abc import Callable, Collection, Sequence
from typing import cast

import orjson

from service.model import (
    ALLOWED_TRANSITIONS,
    REFUNDING_MOVES,
    TERMINAL_STATES,
    Acceptance,
    EventStatus,
    InboundEvent,
    Job,
    JobState,
    JobUpdate,
    NewJob,
    NewOutboxMessage,
    OutboxMessage,
    Replay,
    ReplayedJob,
    SpendCap,
    StoredEvent,
    Transition,
)
from service.store.base import FencedError, StaleTransitionError, UnknownJobError
from service.store.filters import events_where, jobs_where
from service.store.job_writes import job_changes, plan_mapping

JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(Job))
_JOB_SELECT = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"  # noqa: S608 - names come from the Job dataclass
_OUTBOX_SELECT = (
    "SELECT id, job_id, target, event_type, payload, attempts, next_attempt_at, status, "
    "last_error, export_name FROM outbox"
)
_TERMINAL = tuple(sorted(TERMINAL_STATES))
_TERMINAL_IN = f"({', '.join('?' * len(_TERMINAL))})"
_PURGE_SELECT = (
    "SELECT e.id FROM events e WHERE e.received_at < ? AND NOT EXISTS ("  # noqa: S608 - only placeholders are interpolated
    "  SELECT 1 FROM jobs j WHERE j.event_row = e.id AND ("
    "   j.state NOT IN " + _TERMINAL_IN + " OR EXISTS ("
    "     SELECT 1 FROM outbox o WHERE o.job_id = j.job_id AND o.status <> 'delivered')))"
    " ORDER BY e.id LIMIT ?"
)


_IN_CHUNK = 500
"""Ids per `IN (...)` list: well under SQLite's bound-parameter limit."""


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


# --- rows -> value objects --------------------------------------------------------------


def job_from_row(row: sqlite3.Row) -> Job:
    """Rebuild a Job from a row selected with `_JOB_SELECT`."""
    values = {name: row[name] for name in JOB_COLUMNS}
    values["state"] = JobState(values["state"])
    return Job(**values)


def _outbox_from_row(row: sqlite3.Row) -> OutboxMessage:
    return OutboxMessage(
        id=row["id"],
        job_id=row["job_id"],
        target=row["target"],
        event_type=row["event_type"],
        payload=row["payload"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        status=row["status"],
        last_error=row["last_error"],
        export_name=row["export_name"],
    )


# --- intake -----------------------------------------------------------------------------


def _existing_acceptance(conn: sqlite3.Connection, event: InboundEvent) -> Acceptance | None:
    row = conn.execute(
        "SELECT id, event_id, status FROM events WHERE source = ? AND dedupe_key = ?",
        (event.source, event.dedupe_key),
    ).fetchone()
    if row is None:
        return None
    job_ids = conn.execute(
        "SELECT job_id FROM jobs WHERE event_row = ? ORDER BY seq", (row["id"],)
    ).fetchall()
    return Acceptance(
        event_id=row["event_id"],
        job_ids=tuple(j["job_id"] for j in job_ids),
        duplicate=True,
        status=EventStatus(row["status"]),
    )


_EVENT_INSERT = (
    "INSERT INTO events (source, dedupe_key, event_id, event_type, body, headers,"
    " received_at, status, reason, failed_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
TRANSITION_INSERT = (
    "INSERT INTO transitions (job_seq, job_id, from_state, to_state, at, note)"
    " VALUES ((SELECT seq FROM jobs WHERE job_id = ?), ?, ?, ?, ?, ?)"
)
"""Rows are `history_row`s: a job that does not exist leaves `job_seq` NULL, refused."""


def history_row(row: tuple[object, ...]) -> tuple[object, ...]:
    """The `TRANSITION_INSERT` row of `(job_id, from_state, to_state, at, note)`.

    The job id comes twice: once to find the job's `seq`, once to be kept.
    """
    return (row[0], *row)


def _event_row(event: InboundEvent, status: EventStatus, reason: str | None) -> tuple[object, ...]:
    return (
        event.source,
        event.dedupe_key,
        event.event_id,
        event.event_type,
        event.body,
        orjson.dumps(event.headers if type(event.headers) is dict else dict(event.headers)),
        event.received_at,
        status.value,
        reason,
        event.failed_step if reason is not None else None,
    )


def _insert_event(
    conn: sqlite3.Connection, event: InboundEvent, status: EventStatus, reason: str | None
) -> int:
    cursor = conn.execute(_EVENT_INSERT, _event_row(event, status, reason))
    row = cursor.lastrowid
    if row is None:
        raise sqlite3.InternalError("INSERT returned no row id")
    return row


def accept_event(
    conn: sqlite3.Connection, event: InboundEvent, jobs: Sequence[NewJob], now: float
) -> Acceptance:
    """Insert the event and its jobs, or return the original acceptance of a duplicate.

    An event with a `reason` is a dead letter, possibly with the jobs of its other routes.
    """
    existing = _existing_acceptance(conn, event)
    if existing is not None:
        return existing
    status = _status_of(event.reason, has_jobs=bool(jobs))
    event_row = _insert_event(conn, event, status, event.reason)
    for job in jobs:
        _insert_job(conn, job, event_row, event, now)
    return Acceptance(
        event_id=event.event_id,
        job_ids=tuple(job.job_id for job in jobs),
        duplicate=False,
        status=status,
    )


def _status_of(reason: str | None, *, has_jobs: bool) -> EventStatus:
    if reason is not None:
        return EventStatus.DEAD_LETTERED
    return EventStatus.ROUTED if has_jobs else EventStatus.IGNORED


def _insert_job(
    conn: sqlite3.Connection,
    job: NewJob,
    event_row: int,
    event: InboundEvent,
    now: float,
    *,
    note: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO jobs (job_id, event_row, event_id, source, route, state, export_name,"
        " created_at, updated_at, error_code, error_message)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.job_id,
            event_row,
            event.event_id,
            event.source,
            job.route,
            job.state.value,
            job.export_name,
            now,
            now,
            job.error_code,
            job.error_message,
        ),
    )
    _record_transition(
        conn, job_id=job.job_id, from_state=None, to_state=job.state, at=now, note=note
    )


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptItem:
    """One `accept_event` call for the writer's group: its arguments and its `intake_rows` row.

    The row is built by the caller, on the event loop, where it costs no GIL hand-over: the
    writer thread's own Python work is what the event loop has to wait for.
    """

    event: InboundEvent
    jobs: Sequence[NewJob]
    now: float
    row: tuple[object, ...] | None
    """None when a job field holds U+0000, which the trigger's JSON would cut short."""


def accept_item(event: InboundEvent, jobs: Sequence[NewJob], now: float) -> AcceptItem:
    """The writer's item for one delivery (see `accept_events`)."""
    return AcceptItem(event, jobs, now, _intake_row(event, jobs, now))


_JOB_INSERT = (
    "INSERT INTO jobs (job_id, event_row, event_id, source, route, state, export_name,"
    " created_at, updated_at, error_code, error_message)"
    " VALUES (?, (SELECT id FROM events WHERE source = ? AND dedupe_key = ?),"
    " ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


INTAKE_VIEW = (
    "CREATE TEMP VIEW IF NOT EXISTS intake_rows (source, dedupe_key, event_id, event_type, body,"
    " headers, received_at, status, reason, failed_step, now, jobs) AS"
    " SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0"
)
INTAKE_TRIGGER = """
CREATE TEMP TRIGGER IF NOT EXISTS intake_rows_insert INSTEAD OF INSERT ON intake_rows BEGIN
    INSERT INTO events (source, dedupe_key, event_id, event_type, body, headers,
                             received_at, status, reason, failed_step)
    VALUES (NEW.source, NEW.dedupe_key, NEW.event_id, NEW.event_type, NEW.body, NEW.headers,
            NEW.received_at, NEW.status, NEW.reason, NEW.failed_step);
    INSERT INTO jobs (job_id, event_row, event_id, source, route, state, export_name,
                           created_at, updated_at, error_code, error_message)
    SELECT json_extract(j.value, '$[0]'),
           (SELECT id FROM events WHERE source = NEW.source AND dedupe_key = NEW.dedupe_key),
           NEW.event_id, NEW.source, json_extract(j.value, '$[1]'),
           json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'), NEW.now, NEW.now,
           json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]')
    FROM json_each(NEW.jobs) AS j ORDER BY j.key;
    INSERT INTO transitions (job_seq, job_id, from_state, to_state, at, note)
    SELECT jobs.seq, jobs.job_id, NULL, jobs.state, NEW.now, NULL
    FROM json_each(NEW.jobs) AS j JOIN jobs ON jobs.job_id = json_extract(j.value, '$[0]')
    ORDER BY j.key;
END
"""
_INTAKE_INSERT = "INSERT INTO intake_rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INTAKE_WIDTH = _INTAKE_INSERT.count("?")


def prepare_writer(conn: sqlite3.Connection) -> None:
    """Give the writer connection its intake view (TEMP: nothing in the database file changes).

    Inserting rows into the view inserts each event, its jobs and their first history rows,
    all inside SQLite: see `accept_events`.
    """
    conn.execute(INTAKE_VIEW)
    conn.execute(INTAKE_TRIGGER)


def accept_events(conn: sqlite3.Connection, items: list[AcceptItem]) -> list[Acceptance]:
    """`accept_event` for many events, in one statement when none of them is a duplicate.

    The writer thread lets go of the GIL for each statement and has to win it back from a busy
    event loop after it, a wait that made the group's few statements take several times their
    CPU under webhook load. So the usual group, all new events, is one multi-row INSERT into
    the writer's `intake_rows` view, whose trigger inserts events, jobs and first history rows.
    A duplicate (stored before, or twice in the group) makes that statement fail whole on the
    UNIQUE constraint, undone by SQLite; the group then takes the way that looks them up.
    """
    rows = _intake_rows(items)
    if rows is not None and _insert_all_or_nothing(conn, rows):
        return [_new_acceptance(item.event, item.jobs) for item in items]
    return _accept_events_with_duplicates(conn, items)


def accept_events_at_once(
    conn: sqlite3.Connection, items: list[AcceptItem]
) -> list[Acceptance] | None:
    """The group as ONE statement outside any transaction: its own BEGIN and COMMIT.

    A batch of deliveries alone is then a single step of SQLite, the commit's fsync included,
    and a single GIL hand-over for the writer thread instead of one per statement. None when
    it cannot be: duplicates (the statement failed and SQLite undid it) or more rows than one
    statement takes; the writer then commits the group the usual way.
    """
    rows = _intake_rows(items)
    if rows is None or len(rows) > _rows_per_insert(_INTAKE_WIDTH):
        return None  # more rows would be several statements: not one transaction
    if not _insert_all_or_nothing(conn, rows):
        return None
    return [_new_acceptance(item.event, item.jobs) for item in items]


def _intake_rows(items: list[AcceptItem]) -> list[tuple[object, ...]] | None:
    """The items' `intake_rows` rows; None when the way that looks duplicates up is needed."""
    if len({(item.event.source, item.event.dedupe_key) for item in items}) != len(items):
        return None  # the same event twice in the group
    rows = [item.row for item in items]
    return None if None in rows else cast("list[tuple[object, ...]]", rows)


def _insert_all_or_nothing(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> bool:
    """Insert `rows` into `intake_rows`; on a UNIQUE failure leave nothing and return False.

    One statement is undone by SQLite itself; a group too large for one statement is wrapped
    in a savepoint, so its first statements do not stay behind when a later one fails.
    """
    if len(rows) <= _rows_per_insert(_INTAKE_WIDTH):
        try:
            _insert_one(conn, _INTAKE_INSERT, rows)
        except sqlite3.IntegrityError:
            return False
        return True
    conn.execute("SAVEPOINT intake_rows")
    try:
        _insert_many(conn, _INTAKE_INSERT, rows)
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO intake_rows")
        conn.execute("RELEASE intake_rows")
        return False
    conn.execute("RELEASE intake_rows")
    return True


def _intake_row(
    event: InboundEvent, jobs: Sequence[NewJob], now: float
) -> tuple[object, ...] | None:
    status = _status_of(event.reason, has_jobs=bool(jobs))
    job_list = [
        [job.job_id, job.route, job.state.value, job.export_name, job.error_code, job.error_message]
        for job in jobs
    ]
    encoded = orjson.dumps(job_list)
    if b"\\u0000" in encoded:  # JSON's escape of U+0000 (or, harmlessly, a field spelling it)
        return None
    return (*_event_row(event, status, event.reason), now, encoded)


def _new_acceptance(event: InboundEvent, jobs: Sequence[NewJob]) -> Acceptance:
    return Acceptance(
        event_id=event.event_id,
        job_ids=tuple(job.job_id for job in jobs),
        duplicate=False,
        status=_status_of(event.reason, has_jobs=bool(jobs)),
    )


def _accept_events_with_duplicates(
    conn: sqlite3.Connection, items: list[AcceptItem]
) -> list[Acceptance]:
    """The group when it has duplicates, in a few statements whatever its size.

    One SELECT finds the duplicates already stored, duplicates within the group are answered
    with the first of them, and the new events, their jobs and their first history rows go in
    with one multi-row INSERT each.
    """
    stored = _stored_acceptances(conn, [(i.event.source, i.event.dedupe_key) for i in items])
    answers: list[Acceptance | None] = []
    first_of: dict[tuple[str, str], int] = {}
    new_events: list[tuple[object, ...]] = []
    new_jobs: list[tuple[object, ...]] = []
    history: list[tuple[object, ...]] = []
    for index, item in enumerate(items):
        event, jobs, now = item.event, item.jobs, item.now
        key = (event.source, event.dedupe_key)
        if key in stored:
            answers.append(stored[key])
            continue
        if key in first_of:
            answers.append(None)  # the first delivery's acceptance, as a duplicate (below)
            continue
        first_of[key] = index
        status = _status_of(event.reason, has_jobs=bool(jobs))
        new_events.append(_event_row(event, status, event.reason))
        for job in jobs:
            new_jobs.append(_job_row(event, job, now))
            history.append(history_row((job.job_id, None, job.state.value, now, None)))
        answers.append(_new_acceptance(event, jobs))
    _insert_many(conn, _EVENT_INSERT, new_events)
    _insert_many(conn, _JOB_INSERT, new_jobs)
    _insert_many(conn, TRANSITION_INSERT, history)
    return [
        answer
        if answer is not None
        else _as_duplicate(answers[first_of[(i.event.source, i.event.dedupe_key)]])
        for answer, i in zip(answers, items, strict=True)
    ]


def _insert_one(conn: sqlite3.Connection, insert: str, rows: list[tuple[object, ...]]) -> None:
    """Insert `rows` with exactly one multi-row INSERT (at most `_rows_per_insert` of them).

    One statement is all or nothing; `_insert_many` may cut a group into several.
    """
    head, _, values = insert.partition(" VALUES ")
    sql = _multi_row_sql(head, values, len(rows))
    conn.execute(sql, [value for row in rows for value in row])


def _insert_many(conn: sqlite3.Connection, insert: str, rows: list[tuple[object, ...]]) -> None:
    """Insert `rows` with one multi-row INSERT, or a few for a large group.

    `executemany` runs one statement step per row, and each step lets go of the GIL and has to
    win it back from a busy event loop; one multi-row INSERT is one step. Up to _EXACT_ROWS rows
    go in one statement of exactly that size; more are cut into power-of-two statements first.
    So a group of up to 16 is one statement a table, the distinct statements stay under 20 a
    table (the writer's statement cache keeps them all), and none binds more than
    _MAX_PARAMETERS values.
    """
    most = _rows_per_insert(insert.count("?"))
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = left if left <= min(_EXACT_ROWS, most) else 1 << (min(left, most).bit_length() - 1)
        _insert_one(conn, insert, rows[start : start + size])
        start += size


_EXACT_ROWS = 16
_MAX_ROWS_PER_INSERT = 128
_MAX_PARAMETERS = 999
"""SQLite's bound on parameters per statement before 3.32, kept by builds that set it: a group of
hundreds of jobs (12 values each) must not become one statement of more than that."""


@functools.lru_cache(maxsize=16)
def _rows_per_insert(width: int) -> int:
    """The most rows of `width` values one multi-row INSERT takes: under both bounds above."""
    return max(1, min(_MAX_ROWS_PER_INSERT, _MAX_PARAMETERS // width))


@functools.lru_cache(maxsize=256)
def _multi_row_sql(head: str, values: str, rows: int) -> str:
    return f"{head} VALUES {', '.join([values] * rows)}"


def _as_duplicate(first: Acceptance | None) -> Acceptance:
    if first is None:
        raise RuntimeError("a duplicate within a group precedes its first delivery")
    return dataclasses.replace(first, duplicate=True)


def _stored_acceptances(
    conn: sqlite3.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], Acceptance]:
    """The original acceptance of every key already in the inbox, in two statements."""
    unique = list(dict.fromkeys(keys))
    rows = conn.execute(
        "SELECT e.id, e.source, e.dedupe_key, e.event_id, e.status FROM json_each(?) AS k"
        " JOIN events AS e ON e.source = json_extract(k.value, '$[0]')"
        " AND e.dedupe_key = json_extract(k.value, '$[1]')",
        (orjson.dumps(unique),),
    ).fetchall()
    if not rows:
        return {}
    job_ids: dict[int, list[str]] = {row["id"]: [] for row in rows}
    for job in conn.execute(
        "SELECT event_row, job_id FROM jobs WHERE event_row IN (SELECT value FROM json_each(?))"
        " ORDER BY seq",
        (orjson.dumps(list(job_ids)),),
    ):
        job_ids[job["event_row"]].append(job["job_id"])
    return {
        (row["source"], row["dedupe_key"]): Acceptance(
            event_id=row["event_id"],
            job_ids=tuple(job_ids[row["id"]]),
            duplicate=True,
            status=EventStatus(row["status"]),
        )
        for row in rows
    }


def _job_row(event: InboundEvent, job: NewJob, now: float) -> tuple[object, ...]:
    return (
        job.job_id,
        event.source,
        event.dedupe_key,
        event.event_id,
        event.source,
        job.route,
        job.state.value,
        job.export_name,
        now,
        now,
        job.error_code,
        job.error_message,
    )


def reject_event(conn: sqlite3.Connection, event: InboundEvent, reason: str) -> Acceptance:
    """Insert a dead-lettered event, or return the original acceptance of a duplicate."""
    return accept_event(conn, dataclasses.replace(event, reason=reason), (), 0.0)


def replay_event(
    conn: sqlite3.Connection, *, row: int, decided: InboundEvent, jobs: Sequence[NewJob], now: float
) -> Replay:
    """Re-decide a stored event: new identity and outcome, jobs only for routes without one.

    `decided` carries what the current configuration makes of the row (its body and headers
    are not rewritten). When its dedupe key now names another stored event, that event is the
    same delivery: the row is marked a duplicate of it and nothing is created.
    """
    stored = get_event(conn, row)
    if stored is None:
        raise LookupError(f"no event {row}")
    if decided.dedupe_key != stored.dedupe_key:
        other = conn.execute(
            "SELECT id FROM events WHERE source = ? AND dedupe_key = ?",
            (stored.source, decided.dedupe_key),
        ).fetchone()
        if other is not None:
            conn.execute(
                "UPDATE events SET status = ?, reason = ?, failed_step = NULL,"
                " replays = replays + 1 WHERE id = ?",
                (EventStatus.IGNORED.value, f"same event as #{other['id']}", row),
            )
            return Replay(_replayed(conn, row), _jobs_of(conn, other["id"]), other["id"])
    replayed: list[ReplayedJob] = []
    for job in jobs:
        found = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        if found is None:
            _insert_job(conn, job, row, decided, now, note="replayed by operator")
            replayed.append(ReplayedJob(job.job_id, job.route, job.state, created=True))
        else:
            replayed.append(
                ReplayedJob(job.job_id, job.route, JobState(found["state"]), created=False)
            )
    has_jobs = (
        bool(jobs)
        or conn.execute("SELECT 1 FROM jobs WHERE event_row = ? LIMIT 1", (row,)).fetchone()
        is not None
    )
    conn.execute(
        "UPDATE events SET dedupe_key = ?, event_id = ?, event_type = ?, status = ?, reason = ?,"
        " failed_step = ?, replays = replays + 1 WHERE id = ?",
        (
            decided.dedupe_key,
            decided.event_id,
            decided.event_type,
            _status_of(decided.reason, has_jobs=has_jobs).value,
            decided.reason,
            decided.failed_step if decided.reason is not None else None,
            row,
        ),
    )
    return Replay(_replayed(conn, row), tuple(replayed))


def _replayed(conn: sqlite3.Connection, row: int) -> StoredEvent:
    event = get_event(conn, row)
    if event is None:
        raise sqlite3.InternalError(f"event {row} vanished inside its own transaction")
    return event


def _jobs_of(conn: sqlite3.Connection, row: int) -> tuple[ReplayedJob, ...]:
    found = conn.execute(
        "SELECT job_id, route, state FROM jobs WHERE event_row = ? ORDER BY seq", (row,)
    ).fetchall()
    return tuple(
        ReplayedJob(j["job_id"], j["route"], JobState(j["state"]), created=False) for j in found
    )


# --- jobs -------------------------------------------------------------------------------


def _record_transition(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    from_state: JobState | None,
    to_state: JobState,
    at: float,
    note: str | None,
) -> None:
    conn.execute(
        TRANSITION_INSERT,
        history_row((job_id, from_state.value if from_state else None, to_state.value, at, note)),
    )


def _current_state(conn: sqlite3.Connection, job_id: str, fence: int | None = None) -> JobState:
    row = conn.execute("SELECT state, fence FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise UnknownJobError(f"job {job_id} does not exist")
    if fence is not None and row["fence"] != fence:
        raise FencedError(f"job {job_id} was claimed again (fence {row['fence']}, held {fence})")
    return JobState(row["state"])


def _apply_update(
    conn: sqlite3.Connection,
    job_id: str,
    update: JobUpdate | None,
    now: float,
    state: JobState | None,
) -> Job:
    changes: list[tuple[str, object]] = [("updated_at", now)]
    if state is not None:
        changes.append(("state", state.value))
    if update is not None:
        changes += job_changes(update)
    assignments = ", ".join(f"{name} = ?" for name, _ in changes)
    conn.execute(
        f"UPDATE jobs SET {assignments} WHERE job_id = ?",  # noqa: S608 - names come from the JobUpdate dataclass
        (*(value for _, value in changes), job_id),
    )
    row = conn.execute(f"{_JOB_SELECT} WHERE job_id = ?", (job_id,)).fetchone()
    return job_from_row(row)


def transition(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    from_states: Collection[JobState],
    to_state: JobState,
    update: JobUpdate | None,
    outbox: Sequence[NewOutboxMessage],
    now: float,
    fence: int | None = None,
) -> Job:
    """Compare-and-set the state (and the fence, when given), record history and outbox rows."""
    current = _current_state(conn, job_id, fence)
    if current not in from_states:
        expected = ", ".join(sorted(str(s) for s in from_states)) or "nothing"
        raise StaleTransitionError(f"job {job_id} is {current}, expected one of: {expected}")
    if to_state not in ALLOWED_TRANSITIONS[current]:
        raise ValueError(f"job {job_id}: the move {current} -> {to_state} is not allowed")
    job = _apply_update(conn, job_id, update, now, to_state)
    _record_transition(
        conn,
        job_id=job_id,
        from_state=current,
        to_state=to_state,
        at=now,
        note=update.note if update else None,
    )
    if (current, to_state) in REFUNDING_MOVES:
        conn.execute(
            "DELETE FROM spend WHERE id = (SELECT MAX(id) FROM spend WHERE job_id = ?)", (job_id,)
        )
    for message in outbox:
        _enqueue(conn, job, message, now)
    return job


def _spent_under(conn: sqlite3.Connection, cap: SpendCap) -> int:
    if cap.route is None:
        row = conn.execute("SELECT COUNT(*) FROM spend WHERE at >= ?", (cap.since,)).fetchone()
    else:
        row = conn.execute(
            "SELECT COUNT(*) FROM spend WHERE at >= ? AND route = ?", (cap.since, cap.route)
        ).fetchone()
    return int(row[0])


def spend_or_hold(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    caps: Sequence[SpendCap],
    update: JobUpdate,
    announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
    now: float,
    fence: int | None = None,
) -> Job:
    """`mapped -> submitting` with a spend record, or `mapped -> held` when a cap is full.

    Runs in the writer's transaction, so the count, the decision and the record are one
    atomic step: no two paid calls can both take the last unit of room.
    """
    current = _current_state(conn, job_id, fence)
    if current is not JobState.MAPPED:
        raise StaleTransitionError(f"job {job_id} is {current}, expected mapped")
    for cap in caps:
        if _spent_under(conn, cap) < cap.limit:
            continue
        reason = f"spending cap reached: {cap.limit} exports in {cap.period}"
        held = transition(
            conn,
            job_id=job_id,
            from_states={JobState.MAPPED},
            to_state=JobState.HELD,
            update=JobUpdate(
                error_code="budget_exhausted",
                error_message=reason,
                note=reason,
                project_id=update.project_id,  # a drafted job keeps its unbilled draft
            ),
            outbox=(),
            now=now,
            fence=fence,
        )
        first = conn.execute(
            "INSERT INTO budget_alerts (period, job_id, at) VALUES (?, ?, ?)"
            " ON CONFLICT (period) DO NOTHING",
            (cap.period, job_id, now),
        ).rowcount
        if first:
            for message in announce(held, cap):
                _enqueue(conn, held, message, now)
        return held
    job = transition(
        conn,
        job_id=job_id,
        from_states={JobState.MAPPED},
        to_state=JobState.SUBMITTING,
        update=update,
        outbox=(),
        now=now,
        fence=fence,
    )
    conn.execute(
        "INSERT INTO spend (job_id, route, export_name, at) VALUES (?, ?, ?, ?)",
        (job_id, job.route, job.export_name, now),
    )
    return job


def cached_render(conn: sqlite3.Connection, render_key: str, since: float) -> Job | None:
    """The latest job with this render key whose own export became ready at or after `since`."""
    row = conn.execute(
        f"{_JOB_SELECT} WHERE render_key = ? AND ready_at >= ? AND state IN (?, ?)"
        " AND download_url IS NOT NULL AND reused_from IS NULL"
        " ORDER BY ready_at DESC LIMIT 1",
        (render_key, since, JobState.READY.value, JobState.NOTIFIED.value),
    ).fetchone()
    return job_from_row(row) if row is not None else None


_WAITING = (JobState.MAPPED.value, JobState.HELD.value)


def map_coalesced(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    update: JobUpdate,
    announce: Callable[[Job], Sequence[NewOutboxMessage]],
    now: float,
) -> Job:
    """`received -> mapped` for a coalescing job, superseding the older waiting jobs of its key.

    Waiting means `mapped` or `held`: a job once submitted is never superseded. A job mapped
    after a newer one of its key (mapping runs side by side) is itself superseded by it.
    """
    key = update.coalesce_key
    if key is None:
        raise ValueError("map_coalesced needs update.coalesce_key")
    row = conn.execute("SELECT seq FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise UnknownJobError(f"job {job_id} does not exist")
    seq = row["seq"]
    newer = conn.execute(
        "SELECT job_id FROM jobs WHERE coalesce_key = ? AND seq > ? AND state IN (?, ?)"
        " ORDER BY seq DESC LIMIT 1",
        (key, seq, *_WAITING),
    ).fetchone()
    if newer is not None:
        return _supersede(conn, job_id, {JobState.RECEIVED}, newer["job_id"], key, announce, now)
    job = transition(
        conn,
        job_id=job_id,
        from_states={JobState.RECEIVED},
        to_state=JobState.MAPPED,
        update=update,
        outbox=(),
        now=now,
    )
    older = conn.execute(
        "SELECT job_id FROM jobs WHERE coalesce_key = ? AND seq < ? AND state IN (?, ?)"
        " ORDER BY seq",
        (key, seq, *_WAITING),
    ).fetchall()
    for old in older:
        _supersede(
            conn, old["job_id"], {JobState.MAPPED, JobState.HELD}, job_id, key, announce, now
        )
    return job


def _supersede(  # noqa: PLR0917 - one private helper of map_coalesced
    conn: sqlite3.Connection,
    job_id: str,
    from_states: Collection[JobState],
    by: str,
    key: str,
    announce: Callable[[Job], Sequence[NewOutboxMessage]],
    now: float,
) -> Job:
    superseded = transition(
        conn,
        job_id=job_id,
        from_states=from_states,
        to_state=JobState.SUPERSEDED,
        update=JobUpdate(coalesce_key=key, superseded_by=by, note=f"superseded by {by}"),
        outbox=(),
        now=now,
    )
    for message in announce(superseded):
        _enqueue(conn, superseded, message, now)
    _repoint_superseded(conn, key, job_id, by, now)
    return superseded


def _repoint_superseded(
    conn: sqlite3.Connection, key: str, was: str, now_by: str, now: float
) -> None:
    """Jobs superseded earlier by `was` now point at `now_by`, the job that will render.

    So `superseded_by` never chains: A superseded by B, then B by C, leaves A pointing at C.
    A's announcement already named B; B's own names C, so a consumer can follow it too.
    """
    conn.execute(
        "UPDATE jobs SET superseded_by = ?, updated_at = ?"
        " WHERE coalesce_key = ? AND superseded_by = ? AND state = ?",
        (now_by, now, key, was, JobState.SUPERSEDED.value),
    )


def spend_counts(conn: sqlite3.Connection, since: float) -> dict[str, int]:
    """Paid calls recorded since `since`, per route."""
    rows = conn.execute(
        "SELECT route, COUNT(*) AS n FROM spend WHERE at >= ? GROUP BY route", (since,)
    ).fetchall()
    return {row["route"]: int(row["n"]) for row in rows}


def _enqueue(conn: sqlite3.Connection, job: Job, message: NewOutboxMessage, now: float) -> None:
    """Insert one announcement of the job's current round, unless that round already has it."""
    if message.export_name != job.export_name:
        raise ValueError(
            f"job {job.job_id}: outbox row of round {message.export_name!r},"
            f" but the job is in round {job.export_name!r}"
        )
    conn.execute(
        "INSERT INTO outbox (job_id, export_name, target, event_type, payload, next_attempt_at,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id, target, event_type, export_name) DO NOTHING",
        (
            job.job_id,
            job.export_name,
            message.target,
            message.event_type,
            message.payload,
            now,
            now,
        ),
    )


def update_job(
    conn: sqlite3.Connection, job_id: str, update: JobUpdate, now: float, fence: int | None = None
) -> Job:
    """Change fields in place; no state change, so no history row (the note is unused)."""
    _current_state(conn, job_id, fence)
    return _apply_update(conn, job_id, update, now, None)


_FREE = "(owner IS NULL OR owner = ? OR lease_until IS NULL OR lease_until <= ?)"
"""A job nobody else holds: never claimed, its lease over, or the claimant's own."""
_EXPIRED = "(owner IS NULL OR owner <> ? OR lease_until IS NULL) AND COALESCE(lease_until, 0) <= ?"
"""A job another worker (or nobody) held whose lease is over: what a take-over may claim."""


def claim_job(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    states: Collection[JobState],
    owner: str,
    lease_until: float,
    now: float,
) -> Job | None:
    """Take one free job in `states` for `owner`, bumping its fence; None when not free."""
    values = [JobState(s).value for s in states]
    if not values:
        return None
    cursor = conn.execute(
        "UPDATE jobs SET owner = ?, lease_until = ?, fence = fence + 1"  # noqa: S608 - only placeholders are interpolated
        f" WHERE job_id = ? AND state IN ({_placeholders(len(values))}) AND {_FREE}",
        (owner, lease_until, job_id, *values, owner, now),
    )
    if cursor.rowcount == 0:
        return None
    return get_job(conn, job_id=job_id)


def claim_jobs(
    conn: sqlite3.Connection,
    *,
    states: Collection[JobState],
    owner: str,
    lease_until: float,
    now: float,
    limit: int,
    take_own: bool = True,
) -> list[Job]:
    """Take up to `limit` free jobs in `states`, oldest first, each with a bumped fence.

    Without `take_own`, the claimant's own jobs are left alone (a running worker's take-over
    scan must not re-claim what it is working on).
    """
    values = [JobState(s).value for s in states]
    if not values or limit < 1:
        return []
    free = _FREE if take_own else _EXPIRED
    rows = conn.execute(
        f"SELECT job_id FROM jobs WHERE state IN ({_placeholders(len(values))}) AND {free}"  # noqa: S608 - only placeholders are interpolated
        " ORDER BY created_at, seq LIMIT ?",
        (*values, owner, now, limit),
    ).fetchall()
    ids = [row["job_id"] for row in rows]
    conn.executemany(
        "UPDATE jobs SET owner = ?, lease_until = ?, fence = fence + 1 WHERE job_id = ?",
        [(owner, lease_until, job_id) for job_id in ids],
    )
    claimed = [get_job(conn, job_id=job_id) for job_id in ids]
    return [job for job in claimed if job is not None]


def save_render_estimate(conn: sqlite3.Connection, key: str, seconds: float, now: float) -> None:
    """Store the learned render time of `key`, counting the samples behind it."""
    conn.execute(
        "INSERT INTO render_estimates (key, seconds, samples, updated_at) VALUES (?, ?, 1, ?)"
        " ON CONFLICT (key) DO UPDATE SET seconds = excluded.seconds,"
        " samples = render_estimates.samples + 1, updated_at = excluded.updated_at",
        (key, seconds, now),
    )


def render_estimates(conn: sqlite3.Connection) -> dict[str, float]:
    """Every learned render time by key."""
    rows = conn.execute("SELECT key, seconds FROM render_estimates").fetchall()
    return {row["key"]: float(row["seconds"]) for row in rows}


def renew_leases(conn: sqlite3.Connection, owner: str, lease_until: float) -> int:
    """Extend every lease `owner` holds on an unfinished job; fences are unchanged.

    Finished jobs keep their last lease: renewing them would cost a write per job ever done.
    """
    cursor = conn.execute(
        "UPDATE jobs SET lease_until = ? WHERE owner = ? AND lease_until IS NOT NULL"  # noqa: S608 - only placeholders are interpolated
        f" AND state NOT IN {_TERMINAL_IN}",
        (lease_until, owner, *_TERMINAL),
    )
    return cursor.rowcount


def map_jobs(
    conn: sqlite3.Connection, *, mapped: Sequence[tuple[str, JobUpdate]], now: float
) -> list[str]:
    """`received -> mapped` for every job still `received`, with its update and history row.

    A few statements for the whole batch (one per distinct set of columns), not four per job.
    """
    ids = [job_id for job_id, _ in mapped]
    still: set[str] = set()
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        still.update(
            row[0]
            for row in conn.execute(
                "SELECT job_id FROM jobs WHERE state = ?"  # noqa: S608 - placeholders only
                f" AND job_id IN ({_placeholders(len(chunk))})",
                (JobState.RECEIVED.value, *chunk),
            )
        )
    plan = plan_mapping(mapped, still, now, "?")
    for assignments, rows in plan.updates.items():
        conn.executemany(f"UPDATE jobs SET {assignments} WHERE job_id = ?", rows)  # noqa: S608 - names come from the JobUpdate dataclass
    conn.executemany(TRANSITION_INSERT, [history_row(row) for row in plan.history])
    return plan.moved


def get_job(conn: sqlite3.Connection, job_id: str) -> Job | None:
    """One job, or None."""
    row = conn.execute(f"{_JOB_SELECT} WHERE job_id = ?", (job_id,)).fetchone()
    return job_from_row(row) if row is not None else None


def jobs_in_states(conn: sqlite3.Connection, states: Collection[JobState], limit: int) -> list[Job]:
    """Jobs in any of the states, oldest first."""
    if not states:
        return []
    values = [JobState(s).value for s in states]
    rows = conn.execute(
        f"{_JOB_SELECT} WHERE state IN ({_placeholders(len(values))})"
        " ORDER BY created_at, seq LIMIT ?",
        (*values, limit),
    ).fetchall()
    return [job_from_row(r) for r in rows]


def list_jobs(
    conn: sqlite3.Connection,
    state: JobState | None,
    route: str | None,
    limit: int,
    after: str | None,
    *,
    source: str | None = None,
    created_since: float | None = None,
) -> list[Job]:
    """A page of jobs, newest first; an unknown `after` id yields an empty page."""
    where, params = jobs_where(
        "?", state=state, route=route, source=source, created_since=created_since, after=after
    )
    rows = conn.execute(
        f"{_JOB_SELECT}{where} ORDER BY created_at DESC, seq DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [job_from_row(r) for r in rows]


def job_ids_with_prefix(conn: sqlite3.Connection, prefix: str, limit: int) -> list[str]:
    """Job ids starting with `prefix`, through the unique index (a range, not LIKE)."""
    if not prefix:
        return []
    # Every string starting with `prefix` sorts at or after it and before its last character
    # incremented (BINARY collation); LIKE would ignore case and bypass the index.
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    rows = conn.execute(
        "SELECT job_id FROM jobs WHERE job_id >= ? AND job_id < ? ORDER BY job_id LIMIT ?",
        (prefix, upper, limit),
    ).fetchall()
    return [r["job_id"] for r in rows]


def job_history(conn: sqlite3.Connection, job_id: str) -> list[Transition]:
    """Every transition of a job, in the order they were committed."""
    rows = conn.execute(
        "SELECT from_state, to_state, at, note FROM transitions"
        " WHERE job_seq = (SELECT seq FROM jobs WHERE job_id = ?) ORDER BY id",
        (job_id,),
    ).fetchall()
    return [
        Transition(
            job_id=job_id,
            from_state=JobState(r["from_state"]) if r["from_state"] is not None else None,
            to_state=JobState(r["to_state"]),
            at=r["at"],
            note=r["note"],
        )
        for r in rows
    ]


def count_jobs_by_state(conn: sqlite3.Connection) -> dict[JobState, int]:
    """Every state with its count, zero included, so metrics never lose a series."""
    counts = dict.fromkeys(JobState, 0)
    for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        counts[JobState(row["state"])] = row["n"]
    return counts


_EVENT_SELECT = (
    "SELECT id, source, dedupe_key, event_id, event_type, body, headers, received_at,"
    " status, reason, failed_step, replays FROM events"
)


def get_events(conn: sqlite3.Connection, rows: Collection[int]) -> dict[int, StoredEvent]:
    """Many inbox rows by id (in chunks under SQLite's parameter limit)."""
    wanted = sorted(set(rows))
    found: dict[int, StoredEvent] = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        for row in conn.execute(
            f"{_EVENT_SELECT} WHERE id IN ({_placeholders(len(chunk))})",
            chunk,
        ):
            event = _event_from_row(row)
            found[event.id] = event
    return found


def get_event(conn: sqlite3.Connection, row: int) -> StoredEvent | None:
    """One inbox row, or None."""
    found = conn.execute(f"{_EVENT_SELECT} WHERE id = ?", (row,)).fetchone()
    return _event_from_row(found) if found is not None else None


def list_events(
    conn: sqlite3.Connection,
    *,
    status: EventStatus | None,
    source: str | None,
    since: float | None,
    event_id: str | None,
    limit: int,
    cursor: int | None,
) -> list[StoredEvent]:
    """A page of inbox rows, newest first, continuing below row id `cursor`."""
    where, params = events_where(
        "?", status=status, source=source, event_id=event_id, since=since, cursor=cursor
    )
    rows = conn.execute(
        f"{_EVENT_SELECT}{where} ORDER BY id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_event_from_row(r) for r in rows]


def _event_from_row(found: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        id=found["id"],
        source=found["source"],
        dedupe_key=found["dedupe_key"],
        event_id=found["event_id"],
        event_type=found["event_type"],
        body=found["body"],
        headers=orjson.loads(found["headers"]),
        received_at=found["received_at"],
        status=EventStatus(found["status"]),
        reason=found["reason"],
        failed_step=found["failed_step"],
        replays=found["replays"],
    )


# --- outbox -----------------------------------------------------------------------------


def due_outbox(conn: sqlite3.Connection, now: float, limit: int) -> list[OutboxMessage]:
    """Pending rows due at `now`, oldest first."""
    rows = conn.execute(
        f"{_OUTBOX_SELECT} WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
        (now, limit),
    ).fetchall()
    return [_outbox_from_row(r) for r in rows]


def _update_outbox(
    conn: sqlite3.Connection, message_id: int, sql: str, params: tuple[object, ...]
) -> None:
    cursor = conn.execute(f"UPDATE outbox SET {sql} WHERE id = ?", (*params, message_id))  # noqa: S608 - callers pass constant SQL
    if cursor.rowcount == 0:
        raise LookupError(f"no outbox message {message_id}")


def outbox_delivered(conn: sqlite3.Connection, message_id: int, now: float) -> None:
    """Mark a row delivered."""
    _update_outbox(conn, message_id, "status = 'delivered', delivered_at = ?", (now,))


def outbox_retry(
    conn: sqlite3.Connection, message_id: int, next_attempt_at: float, error: str
) -> None:
    """Count a failed attempt and schedule the next one."""
    _update_outbox(
        conn,
        message_id,
        "attempts = attempts + 1, next_attempt_at = ?, last_error = ?",
        (next_attempt_at, error),
    )


def outbox_dead(conn: sqlite3.Connection, message_id: int, error: str) -> None:
    """Count the final failed attempt and stop trying; the row stays for inspection."""
    _update_outbox(
        conn, message_id, "status = 'dead', attempts = attempts + 1, last_error = ?", (error,)
    )


def count_pending_outbox(conn: sqlite3.Connection, job_id: str | None) -> int:
    """Pending rows of one job, or of all jobs when `job_id` is None."""
    if job_id is None:
        row = conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()
    else:
        row = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND job_id = ?", (job_id,)
        ).fetchone()
    return int(row[0])


def ready_jobs_delivered(conn: sqlite3.Connection, limit: int) -> list[Job]:
    """`ready` jobs none of whose outbox rows is pending, oldest first."""
    rows = conn.execute(
        f"{_JOB_SELECT} WHERE state = ? AND NOT EXISTS"  # noqa: S608 - constant SQL
        " (SELECT 1 FROM outbox o WHERE o.job_id = jobs.job_id AND o.status = 'pending')"
        " ORDER BY created_at, seq LIMIT ?",
        (JobState.READY.value, limit),
    ).fetchall()
    return [job_from_row(r) for r in rows]


# --- housekeeping -----------------------------------------------------------------------


def purge_events(conn: sqlite3.Connection, older_than: float, limit: int) -> int:
    """Delete up to `limit` old events whose jobs are all finished, with those jobs.

    A job is finished when it is terminal and every outbox row of it is delivered: a pending
    row is still owed to someone, and a dead one is kept for inspection.
    """
    rows = conn.execute(_PURGE_SELECT, (older_than, *_TERMINAL, limit)).fetchall()
    if not rows:
        return 0
    ids = orjson.dumps([r["id"] for r in rows]).decode()
    conn.execute(
        "DELETE FROM outbox WHERE job_id IN"
        " (SELECT job_id FROM jobs WHERE event_row IN (SELECT value FROM json_each(?)))",
        (ids,),
    )
    conn.execute(
        "DELETE FROM transitions WHERE job_seq IN"
        " (SELECT seq FROM jobs WHERE event_row IN (SELECT value FROM json_each(?)))",
        (ids,),
    )
    conn.execute("DELETE FROM jobs WHERE event_row IN (SELECT value FROM json_each(?))", (ids,))
    conn.execute("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))", (ids,))
    return len(rows)


def heartbeat(conn: sqlite3.Connection, now: float) -> None:
    """A real write, so `ping` proves the database takes commits, not just reads."""
    conn.execute(
        "INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = ?",
        (now, now),
    )
