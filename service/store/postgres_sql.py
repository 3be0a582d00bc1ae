"""The SQL of the PostgreSQL engine: async functions of a connection, one per store operation.

Each runs inside the transaction `PostgresStore` opened for it and commits with it. Rows a
transaction is about to decide on are locked (`FOR UPDATE`), so several instances on one
database serialise on the job, not on a process lock; claims skip rows another transaction
holds (`FOR UPDATE SKIP LOCKED`) instead of queueing behind it, the way PostgreSQL job queues
(Procrastinate, River, Oban) claim work. Timestamps come from the store's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import orjson
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from service.model import (
    ALLOWED_TRANSITIONS,
    REFUNDING_MOVES,
    TERMINAL_STATES,
    Acceptance,
    Announcement,
    EventStatus,
    InboundEvent,
    Job,
    JobState,
    JobUpdate,
    MinuteActivity,
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
from service.store.postgres_schema import COALESCE_LOCK_CLASS, SPEND_LOCK
from service.store.sqlite_sql import JOB_COLUMNS

Conn = AsyncConnection[DictRow]

_JOB_COLS = ", ".join(JOB_COLUMNS)
_JOB_SELECT = f"SELECT {_JOB_COLS} FROM jobs"  # noqa: S608 - names come from the Job dataclass
_OUTBOX_COLS = (
    "id, job_id, target, event_type, payload, attempts, next_attempt_at, status, last_error,"
    " export_name"
)
_OUTBOX_RETURNING = ", ".join(f"outbox.{c.strip()}" for c in _OUTBOX_COLS.split(","))
_EVENT_SELECT = (
    "SELECT id, source, dedupe_key, event_id, event_type, body, headers, received_at,"
    " status, reason, failed_step, replays FROM events"
)
_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_MINUTE_S = 60

JOBS_CHANNEL = "studiohook_jobs"
"""NOTIFY channel: a commit created or released work another instance may pick up."""
OUTBOX_CHANNEL = "studiohook_outbox"
"""NOTIFY channel: a commit inserted announcements to send."""


def job_from_row(row: DictRow) -> Job:
    """Rebuild a Job from a row selected with all JOB_COLUMNS."""
    values = {name: row[name] for name in JOB_COLUMNS}
    values["state"] = JobState(values["state"])
    return Job(**values)


def _outbox_from_row(row: DictRow) -> OutboxMessage:
    return OutboxMessage(
        id=row["id"],
        job_id=row["job_id"],
        target=row["target"],
        event_type=row["event_type"],
        payload=bytes(row["payload"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        status=row["status"],
        last_error=row["last_error"],
        export_name=row["export_name"],
    )


def _event_from_row(row: DictRow) -> StoredEvent:
    return StoredEvent(
        id=row["id"],
        source=row["source"],
        dedupe_key=row["dedupe_key"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        body=bytes(row["body"]),
        headers=orjson.loads(row["headers"]),
        received_at=row["received_at"],
        status=EventStatus(row["status"]),
        reason=row["reason"],
        failed_step=row["failed_step"],
        replays=row["replays"],
    )


def _status_of(reason: str | None, *, has_jobs: bool) -> EventStatus:
    if reason is not None:
        return EventStatus.DEAD_LETTERED
    return EventStatus.ROUTED if has_jobs else EventStatus.IGNORED


async def _notify(conn: Conn, channel: str) -> None:
    """Delivered to listeners only if (and when) the transaction commits."""
    await conn.execute("SELECT pg_notify(%s, '')", (channel,))


# --- intake -----------------------------------------------------------------------------


async def _existing_acceptance(conn: Conn, event: InboundEvent) -> Acceptance | None:
    cur = await conn.execute(
        "SELECT id, event_id, status FROM events WHERE source = %s AND dedupe_key = %s",
        (event.source, event.dedupe_key),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return Acceptance(
        event_id=row["event_id"],
        job_ids=await _job_ids_of(conn, row["id"]),
        duplicate=True,
        status=EventStatus(row["status"]),
    )


async def _job_ids_of(conn: Conn, event_row: int) -> tuple[str, ...]:
    cur = await conn.execute(
        "SELECT job_id FROM jobs WHERE event_row = %s ORDER BY seq", (event_row,)
    )
    return tuple(r["job_id"] for r in await cur.fetchall())


async def accept_event(
    conn: Conn, event: InboundEvent, jobs: Sequence[NewJob], now: float
) -> Acceptance:
    """Insert the event and its jobs, or return the original acceptance of a duplicate.

    `ON CONFLICT DO NOTHING` waits for a concurrent insert of the same key (another instance
    taking the same delivery) to commit or roll back, so exactly one of them creates the jobs.
    """
    status = _status_of(event.reason, has_jobs=bool(jobs))
    cur = await conn.execute(
        "INSERT INTO events (source, dedupe_key, event_id, event_type, body, headers,"
        " received_at, status, reason, failed_step)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id",
        (
            event.source,
            event.dedupe_key,
            event.event_id,
            event.event_type,
            event.body,
            orjson.dumps(dict(event.headers)),
            event.received_at,
            status.value,
            event.reason,
            event.failed_step if event.reason is not None else None,
        ),
    )
    inserted = await cur.fetchone()
    if inserted is None:
        existing = await _existing_acceptance(conn, event)
        if existing is None:
            raise StaleTransitionError(f"event {event.dedupe_key!r} conflicted and vanished")
        return existing
    for job in jobs:
        await _insert_job(conn, job, inserted["id"], event, now)
    if jobs:
        await _notify(conn, JOBS_CHANNEL)
    return Acceptance(
        event_id=event.event_id,
        job_ids=tuple(job.job_id for job in jobs),
        duplicate=False,
        status=status,
    )


async def _insert_job(
    conn: Conn,
    job: NewJob,
    event_row: int,
    event: InboundEvent,
    now: float,
    *,
    note: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO jobs (job_id, event_row, event_id, source, route, state, export_name,"
        " created_at, updated_at, error_code, error_message)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
    await _record_transition(
        conn, job.job_id, from_state=None, to_state=job.state, at=now, note=note
    )


async def replay_event(
    conn: Conn, *, row: int, decided: InboundEvent, jobs: Sequence[NewJob], now: float
) -> Replay:
    """Re-decide a stored event (locked for the transaction); see `sqlite_sql.replay_event`."""
    cur = await conn.execute(f"{_EVENT_SELECT} WHERE id = %s FOR UPDATE", (row,))
    found = await cur.fetchone()
    if found is None:
        raise LookupError(f"no event {row}")
    stored = _event_from_row(found)
    if decided.dedupe_key != stored.dedupe_key:
        cur = await conn.execute(
            "SELECT id FROM events WHERE source = %s AND dedupe_key = %s",
            (stored.source, decided.dedupe_key),
        )
        other = await cur.fetchone()
        if other is not None:
            await conn.execute(
                "UPDATE events SET status = %s, reason = %s, failed_step = NULL,"
                " replays = replays + 1 WHERE id = %s",
                (EventStatus.IGNORED.value, f"same event as #{other['id']}", row),
            )
            cur = await conn.execute(
                "SELECT job_id, route, state FROM jobs WHERE event_row = %s ORDER BY seq",
                (other["id"],),
            )
            theirs = tuple(
                ReplayedJob(j["job_id"], j["route"], JobState(j["state"]), created=False)
                for j in await cur.fetchall()
            )
            return Replay(await _event(conn, row), theirs, other["id"])
    replayed: list[ReplayedJob] = []
    for job in jobs:
        cur = await conn.execute("SELECT state FROM jobs WHERE job_id = %s", (job.job_id,))
        existing = await cur.fetchone()
        if existing is None:
            await _insert_job(conn, job, row, decided, now, note="replayed by operator")
            replayed.append(ReplayedJob(job.job_id, job.route, job.state, created=True))
        else:
            state = JobState(existing["state"])
            replayed.append(ReplayedJob(job.job_id, job.route, state, created=False))
    has_jobs = bool(jobs) or bool(await _job_ids_of(conn, row))
    await conn.execute(
        "UPDATE events SET dedupe_key = %s, event_id = %s, event_type = %s, status = %s,"
        " reason = %s, failed_step = %s, replays = replays + 1 WHERE id = %s",
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
    if any(r.created for r in replayed):
        await _notify(conn, JOBS_CHANNEL)
    return Replay(await _event(conn, row), tuple(replayed))


async def _event(conn: Conn, row: int) -> StoredEvent:
    found = await get_event(conn, row)
    if found is None:
        raise LookupError(f"event {row} vanished inside its own transaction")
    return found


async def get_events(conn: Conn, rows: Collection[int]) -> dict[int, StoredEvent]:
    """Many inbox rows by id."""
    cur = await conn.execute(f"{_EVENT_SELECT} WHERE id = ANY(%s)", (sorted(set(rows)),))
    found = [_event_from_row(row) for row in await cur.fetchall()]
    return {event.id: event for event in found}


async def get_event(conn: Conn, row: int) -> StoredEvent | None:
    """One inbox row, or None."""
    cur = await conn.execute(f"{_EVENT_SELECT} WHERE id = %s", (row,))
    found = await cur.fetchone()
    return _event_from_row(found) if found is not None else None


async def list_events(
    conn: Conn,
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
        "%s", status=status, source=source, event_id=event_id, since=since, cursor=cursor
    )
    cur = await conn.execute(f"{_EVENT_SELECT}{where} ORDER BY id DESC LIMIT %s", (*params, limit))
    return [_event_from_row(r) for r in await cur.fetchall()]


# --- jobs -------------------------------------------------------------------------------


async def _record_transition(
    conn: Conn,
    job_id: str,
    *,
    from_state: JobState | None,
    to_state: JobState,
    at: float,
    note: str | None,
) -> None:
    await conn.execute(
        "INSERT INTO transitions (job_id, from_state, to_state, at, note)"
        " VALUES (%s, %s, %s, %s, %s)",
        (job_id, from_state.value if from_state else None, to_state.value, at, note),
    )


async def _lock_job(conn: Conn, job_id: str, fence: int | None) -> JobState:
    """Lock the job's row for this transaction and check the fence; its current state."""
    cur = await conn.execute(
        "SELECT state, fence FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise UnknownJobError(f"job {job_id} does not exist")
    if fence is not None and row["fence"] != fence:
        raise FencedError(f"job {job_id} was claimed again (fence {row['fence']}, held {fence})")
    return JobState(row["state"])


async def _apply_update(
    conn: Conn, job_id: str, update: JobUpdate | None, now: float, state: JobState | None
) -> Job:
    changes: list[tuple[str, object]] = [("updated_at", now)]
    if state is not None:
        changes.append(("state", state.value))
    if update is not None:
        changes += job_changes(update)
    assignments = ", ".join(f"{name} = %s" for name, _ in changes)
    cur = await conn.execute(
        f"UPDATE jobs SET {assignments} WHERE job_id = %s RETURNING {_JOB_COLS}",  # noqa: S608 - names come from the JobUpdate dataclass
        (*(value for _, value in changes), job_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise UnknownJobError(f"job {job_id} does not exist")
    return job_from_row(row)


async def map_jobs(conn: Conn, *, mapped: Sequence[tuple[str, JobUpdate]], now: float) -> list[str]:
    """`received -> mapped` for every job still `received` (rows locked), with history rows."""
    cur = await conn.execute(
        "SELECT job_id FROM jobs WHERE state = %s AND job_id = ANY(%s) ORDER BY job_id FOR UPDATE",
        (JobState.RECEIVED.value, [job_id for job_id, _ in mapped]),
    )
    still = {row["job_id"] for row in await cur.fetchall()}
    plan = plan_mapping(mapped, still, now, "%s")
    async with conn.cursor() as batch:
        for assignments, rows in plan.updates.items():
            await batch.executemany(
                f"UPDATE jobs SET {assignments} WHERE job_id = %s",  # noqa: S608 - names come from the JobUpdate dataclass
                rows,
            )
        await batch.executemany(
            "INSERT INTO transitions (job_id, from_state, to_state, at, note)"
            " VALUES (%s, %s, %s, %s, %s)",
            plan.history,
        )
    return plan.moved


async def transition(
    conn: Conn,
    *,
    job_id: str,
    from_states: Collection[JobState],
    to_state: JobState,
    update: JobUpdate | None,
    outbox: Sequence[NewOutboxMessage],
    now: float,
    fence: int | None,
) -> Job:
    """Compare-and-set the state (and the fence, when given), record history and outbox rows."""
    current = await _lock_job(conn, job_id, fence)
    if current not in from_states:
        expected = ", ".join(sorted(str(s) for s in from_states)) or "nothing"
        raise StaleTransitionError(f"job {job_id} is {current}, expected one of: {expected}")
    if to_state not in ALLOWED_TRANSITIONS[current]:
        raise ValueError(f"job {job_id}: the move {current} -> {to_state} is not allowed")
    job = await _apply_update(conn, job_id, update, now, to_state)
    await _record_transition(
        conn,
        job_id,
        from_state=current,
        to_state=to_state,
        at=now,
        note=update.note if update else None,
    )
    if (current, to_state) in REFUNDING_MOVES:
        await conn.execute(
            "DELETE FROM spend WHERE id = (SELECT MAX(id) FROM spend WHERE job_id = %s)",
            (job_id,),
        )
    await _enqueue(conn, job, outbox, now)
    return job


async def _enqueue(conn: Conn, job: Job, outbox: Sequence[NewOutboxMessage], now: float) -> None:
    """Insert announcements of the job's current round (once each) and wake the senders."""
    for message in outbox:
        if message.export_name != job.export_name:
            raise ValueError(
                f"job {job.job_id}: outbox row of round {message.export_name!r},"
                f" but the job is in round {job.export_name!r}"
            )
        await conn.execute(
            "INSERT INTO outbox (job_id, export_name, target, event_type, payload,"
            " next_attempt_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
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
    if outbox:
        await _notify(conn, OUTBOX_CHANNEL)


# --- money guard rails ------------------------------------------------------------------


async def _spent_under(conn: Conn, cap: SpendCap) -> int:
    if cap.route is None:
        cur = await conn.execute("SELECT COUNT(*) AS n FROM spend WHERE at >= %s", (cap.since,))
    else:
        cur = await conn.execute(
            "SELECT COUNT(*) AS n FROM spend WHERE at >= %s AND route = %s",
            (cap.since, cap.route),
        )
    row = await cur.fetchone()
    return int(row["n"]) if row is not None else 0


async def spend_or_hold(
    conn: Conn,
    *,
    job_id: str,
    caps: Sequence[SpendCap],
    update: JobUpdate,
    announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
    now: float,
    fence: int | None,
) -> Job:
    """`mapped -> submitting` with a spend record, or `mapped -> held` when a cap is full.

    The job's row is locked and fenced first; then one advisory transaction lock is taken
    before counting, so every instance's count, decision and spend record run one at a time
    (READ COMMITTED: the count, a new statement, sees every spend its predecessor committed).
    No two paid calls can both take the last unit of room.
    """
    current = await _lock_job(conn, job_id, fence)
    if current is not JobState.MAPPED:
        raise StaleTransitionError(f"job {job_id} is {current}, expected mapped")
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SPEND_LOCK,))
    for cap in caps:
        if await _spent_under(conn, cap) < cap.limit:
            continue
        reason = f"spending cap reached: {cap.limit} exports in {cap.period}"
        held = await transition(
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
        cur = await conn.execute(
            "INSERT INTO budget_alerts (period, job_id, at) VALUES (%s, %s, %s)"
            " ON CONFLICT (period) DO NOTHING",
            (cap.period, job_id, now),
        )
        if cur.rowcount:
            await _enqueue(conn, held, announce(held, cap), now)
        return held
    job = await transition(
        conn,
        job_id=job_id,
        from_states={JobState.MAPPED},
        to_state=JobState.SUBMITTING,
        update=update,
        outbox=(),
        now=now,
        fence=fence,
    )
    await conn.execute(
        "INSERT INTO spend (job_id, route, export_name, at) VALUES (%s, %s, %s, %s)",
        (job_id, job.route, job.export_name, now),
    )
    return job


async def cached_render(conn: Conn, *, render_key: str, since: float) -> Job | None:
    """The latest job with this render key whose own export became ready at or after `since`."""
    cur = await conn.execute(
        f"{_JOB_SELECT} WHERE render_key = %s AND ready_at >= %s AND state = ANY(%s)"
        " AND download_url IS NOT NULL AND reused_from IS NULL"
        " ORDER BY ready_at DESC, seq DESC LIMIT 1",
        (render_key, since, [JobState.READY.value, JobState.NOTIFIED.value]),
    )
    row = await cur.fetchone()
    return job_from_row(row) if row is not None else None


_WAITING = [JobState.MAPPED.value, JobState.HELD.value]


async def map_coalesced(
    conn: Conn,
    *,
    job_id: str,
    update: JobUpdate,
    announce: Callable[[Job], Sequence[NewOutboxMessage]],
    now: float,
) -> Job:
    """`received -> mapped` for a coalescing job, superseding the older waiting jobs of its key.

    Waiting means `mapped` or `held`: a job once submitted is never superseded. A job mapped
    after a newer one of its key is itself superseded by it. An advisory transaction lock on
    the key serialises instances mapping jobs of one key, so two of them never both stay
    mapped; the waiting rows are selected `FOR UPDATE`, so a job another instance moved to
    `submitting` meanwhile drops out of the selection instead of being superseded.
    """
    key = update.coalesce_key
    if key is None:
        raise ValueError("map_coalesced needs update.coalesce_key")
    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (COALESCE_LOCK_CLASS, key))
    cur = await conn.execute("SELECT seq FROM jobs WHERE job_id = %s", (job_id,))
    row = await cur.fetchone()
    if row is None:
        raise UnknownJobError(f"job {job_id} does not exist")
    seq = row["seq"]
    cur = await conn.execute(
        "SELECT job_id FROM jobs WHERE coalesce_key = %s AND seq > %s AND state = ANY(%s)"
        " ORDER BY seq DESC LIMIT 1 FOR UPDATE",
        (key, seq, _WAITING),
    )
    newer = await cur.fetchone()
    if newer is not None:
        return await _supersede(
            conn, job_id, {JobState.RECEIVED}, newer["job_id"], key, announce, now
        )
    job = await transition(
        conn,
        job_id=job_id,
        from_states={JobState.RECEIVED},
        to_state=JobState.MAPPED,
        update=update,
        outbox=(),
        now=now,
        fence=None,
    )
    cur = await conn.execute(
        "SELECT job_id FROM jobs WHERE coalesce_key = %s AND seq < %s AND state = ANY(%s)"
        " ORDER BY seq FOR UPDATE",
        (key, seq, _WAITING),
    )
    for old in await cur.fetchall():
        await _supersede(
            conn, old["job_id"], {JobState.MAPPED, JobState.HELD}, job_id, key, announce, now
        )
    return job


async def _supersede(  # noqa: PLR0917 - one private helper of map_coalesced
    conn: Conn,
    job_id: str,
    from_states: Collection[JobState],
    by: str,
    key: str,
    announce: Callable[[Job], Sequence[NewOutboxMessage]],
    now: float,
) -> Job:
    superseded = await transition(
        conn,
        job_id=job_id,
        from_states=from_states,
        to_state=JobState.SUPERSEDED,
        update=JobUpdate(coalesce_key=key, superseded_by=by, note=f"superseded by {by}"),
        outbox=(),
        now=now,
        fence=None,
    )
    await _enqueue(conn, superseded, announce(superseded), now)
    await _repoint_superseded(conn, key, job_id, by, now)
    return superseded


async def _repoint_superseded(conn: Conn, key: str, was: str, now_by: str, now: float) -> None:
    """Jobs superseded earlier by `was` now point at `now_by`, the job that will render.

    So `superseded_by` never chains: A superseded by B, then B by C, leaves A pointing at C.
    A's announcement already named B; B's own names C, so a consumer can follow it too.
    """
    await conn.execute(
        "UPDATE jobs SET superseded_by = %s, updated_at = %s"
        " WHERE coalesce_key = %s AND superseded_by = %s AND state = %s",
        (now_by, now, key, was, JobState.SUPERSEDED.value),
    )


async def waiting_of_key(conn: Conn, *, coalesce_key: str) -> list[Job]:
    """The `mapped`/`held` jobs of one coalesce key, oldest first: what a new one supersedes."""
    cur = await conn.execute(
        f"{_JOB_SELECT} WHERE coalesce_key = %s AND state = ANY(%s) ORDER BY seq",
        (coalesce_key, _WAITING),
    )
    return [job_from_row(row) for row in await cur.fetchall()]


async def spend_counts(conn: Conn, *, since: float) -> dict[str, int]:
    """Paid calls recorded since `since`, per route."""
    cur = await conn.execute(
        "SELECT route, COUNT(*) AS n FROM spend WHERE at >= %s GROUP BY route", (since,)
    )
    return {row["route"]: int(row["n"]) for row in await cur.fetchall()}


async def update_job(
    conn: Conn, *, job_id: str, update: JobUpdate, now: float, fence: int | None
) -> Job:
    """Change fields in place; no state change, so no history row."""
    await _lock_job(conn, job_id, fence)
    return await _apply_update(conn, job_id, update, now, None)


_FREE = "(owner IS NULL OR owner = %(owner)s OR lease_until IS NULL OR lease_until <= %(now)s)"
"""A job nobody else holds: never claimed, its lease over, or the claimant's own."""
_EXPIRED = (
    "(owner IS NULL OR owner <> %(owner)s OR lease_until IS NULL)"
    " AND COALESCE(lease_until, 0) <= %(now)s"
)
"""A job another worker (or nobody) held whose lease is over: what a take-over may claim."""
_CLAIM_SET = "owner = %(owner)s, lease_until = %(lease_until)s, fence = fence + 1"


async def claim_job(
    conn: Conn,
    *,
    job_id: str,
    states: Collection[JobState],
    owner: str,
    lease_until: float,
    now: float,
) -> Job | None:
    """Take one free job in `states` for `owner`, bumping its fence; None when not free.

    The UPDATE locks the row; a concurrent claimant waits, then re-checks the WHERE clause
    against the committed row (READ COMMITTED), so only one of them gets the job.
    """
    values = [JobState(s).value for s in states]
    if not values:
        return None
    cur = await conn.execute(
        f"UPDATE jobs SET {_CLAIM_SET}"  # noqa: S608 - constant SQL
        f" WHERE job_id = %(job_id)s AND state = ANY(%(states)s) AND {_FREE}"
        f" RETURNING {_JOB_COLS}",
        {
            "owner": owner,
            "lease_until": lease_until,
            "now": now,
            "job_id": job_id,
            "states": values,
        },
    )
    row = await cur.fetchone()
    return job_from_row(row) if row is not None else None


async def claim_jobs(
    conn: Conn,
    *,
    states: Collection[JobState],
    owner: str,
    lease_until: float,
    now: float,
    limit: int,
    take_own: bool,
) -> list[Job]:
    """Take up to `limit` free jobs in `states`, oldest first, each with a bumped fence.

    `FOR UPDATE SKIP LOCKED`: rows another instance is claiming or moving right now are
    passed over, so instances scanning together split the work instead of queueing.
    """
    values = [JobState(s).value for s in states]
    if not values or limit < 1:
        return []
    free = _FREE if take_own else _EXPIRED
    cur = await conn.execute(
        f"WITH picked AS (SELECT seq FROM jobs WHERE state = ANY(%(states)s) AND {free}"  # noqa: S608 - constant SQL
        " ORDER BY created_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        f" UPDATE jobs SET {_CLAIM_SET} FROM picked WHERE jobs.seq = picked.seq"
        f" RETURNING {', '.join(f'jobs.{c}' for c in JOB_COLUMNS)}, jobs.seq",
        {"owner": owner, "lease_until": lease_until, "now": now, "states": values, "limit": limit},
    )
    rows = sorted(await cur.fetchall(), key=lambda r: (r["created_at"], r["seq"]))
    return [job_from_row(r) for r in rows]


async def renew_leases(conn: Conn, *, owner: str, lease_until: float) -> int:
    """Extend every lease `owner` holds on an unfinished job; fences are unchanged."""
    cur = await conn.execute(
        "UPDATE jobs SET lease_until = %s WHERE owner = %s AND lease_until IS NOT NULL"
        " AND state <> ALL(%s)",
        (lease_until, owner, _TERMINAL),
    )
    return cur.rowcount


async def save_render_estimate(conn: Conn, *, key: str, seconds: float, now: float) -> None:
    """Store the learned render time of `key`, counting the samples behind it."""
    await conn.execute(
        "INSERT INTO render_estimates (key, seconds, samples, updated_at) VALUES (%s, %s, 1, %s)"
        " ON CONFLICT (key) DO UPDATE SET seconds = excluded.seconds,"
        " samples = render_estimates.samples + 1, updated_at = excluded.updated_at",
        (key, seconds, now),
    )


async def render_estimates(conn: Conn) -> dict[str, float]:
    """Every learned render time by key."""
    cur = await conn.execute("SELECT key, seconds FROM render_estimates")
    return {r["key"]: float(r["seconds"]) for r in await cur.fetchall()}


async def get_job(conn: Conn, *, job_id: str) -> Job | None:
    """One job, or None."""
    cur = await conn.execute(f"{_JOB_SELECT} WHERE job_id = %s", (job_id,))
    row = await cur.fetchone()
    return job_from_row(row) if row is not None else None


async def jobs_in_states(conn: Conn, *, states: Collection[JobState], limit: int) -> list[Job]:
    """Jobs in any of the states, oldest first."""
    if not states:
        return []
    cur = await conn.execute(
        f"{_JOB_SELECT} WHERE state = ANY(%s) ORDER BY created_at, seq LIMIT %s",
        ([JobState(s).value for s in states], limit),
    )
    return [job_from_row(r) for r in await cur.fetchall()]


async def list_jobs(
    conn: Conn,
    *,
    state: JobState | None,
    route: str | None,
    limit: int,
    after: str | None,
    source: str | None,
    created_since: float | None,
) -> list[Job]:
    """A page of jobs, newest first; an unknown `after` id yields an empty page."""
    where, params = jobs_where(
        "%s", state=state, route=route, source=source, created_since=created_since, after=after
    )
    cur = await conn.execute(
        f"{_JOB_SELECT}{where} ORDER BY created_at DESC, seq DESC LIMIT %s", (*params, limit)
    )
    return [job_from_row(r) for r in await cur.fetchall()]


async def job_ids_with_prefix(conn: Conn, *, prefix: str, limit: int) -> list[str]:
    """Job ids starting with `prefix`: a range on the C-collated unique index."""
    if not prefix:
        return []
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    cur = await conn.execute(
        "SELECT job_id FROM jobs WHERE job_id >= %s AND job_id < %s ORDER BY job_id LIMIT %s",
        (prefix, upper, limit),
    )
    return [r["job_id"] for r in await cur.fetchall()]


async def job_history(conn: Conn, *, job_id: str) -> list[Transition]:
    """Every transition of a job, in the order they were committed."""
    cur = await conn.execute(
        "SELECT from_state, to_state, at, note FROM transitions WHERE job_id = %s ORDER BY id",
        (job_id,),
    )
    return [
        Transition(
            job_id=job_id,
            from_state=JobState(r["from_state"]) if r["from_state"] is not None else None,
            to_state=JobState(r["to_state"]),
            at=r["at"],
            note=r["note"],
        )
        for r in await cur.fetchall()
    ]


async def count_jobs_by_state(conn: Conn) -> dict[JobState, int]:
    """Every state with its count, zero included."""
    counts = dict.fromkeys(JobState, 0)
    cur = await conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    for row in await cur.fetchall():
        counts[JobState(row["state"])] = row["n"]
    return counts


# --- outbox -----------------------------------------------------------------------------


async def due_outbox(
    conn: Conn, *, now: float, limit: int, claimant: str | None, lease_until: float
) -> list[OutboxMessage]:
    """Pending rows due at `now`, oldest first; with a `claimant`, claimed for it.

    A claimed row is invisible to other claimants until `lease_until` (renewed by each scan
    of its claimant, released by a retry): instances sharing the database do not both send
    one announcement, and the rows of an instance that died are sent once its claim ends.
    """
    if claimant is None:
        cur = await conn.execute(
            f"SELECT {_OUTBOX_COLS} FROM outbox WHERE status = 'pending'"  # noqa: S608 - constant SQL
            " AND next_attempt_at <= %s ORDER BY id LIMIT %s",
            (now, limit),
        )
        return [_outbox_from_row(r) for r in await cur.fetchall()]
    cur = await conn.execute(
        "WITH picked AS (SELECT id FROM outbox WHERE status = 'pending'"  # noqa: S608 - constant SQL
        " AND next_attempt_at <= %(now)s AND (claimed_by IS NULL OR claimed_by = %(me)s"
        " OR claimed_until <= %(now)s) ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " UPDATE outbox SET claimed_by = %(me)s, claimed_until = %(until)s FROM picked"
        f" WHERE outbox.id = picked.id RETURNING {_OUTBOX_RETURNING}",
        {"now": now, "me": claimant, "limit": limit, "until": lease_until},
    )
    return sorted((_outbox_from_row(r) for r in await cur.fetchall()), key=lambda m: m.id)


async def renew_outbox_claims(
    conn: Conn, *, message_ids: list[int], claimant: str, lease_until: float
) -> None:
    """Move the claim of `claimant`'s pending rows among `message_ids` to `lease_until`.

    A row another instance took over, or one already finished, keeps what it has.
    """
    await conn.execute(
        "UPDATE outbox SET claimed_until = %s"
        " WHERE id = ANY(%s) AND claimed_by = %s AND status = 'pending'",
        (lease_until, message_ids, claimant),
    )


async def update_outbox(
    conn: Conn, message_id: int, assignments: str, params: tuple[object, ...]
) -> None:
    """Apply constant `assignments` to one outbox row; LookupError when it does not exist."""
    cur = await conn.execute(
        f"UPDATE outbox SET {assignments} WHERE id = %s",  # noqa: S608 - callers pass constant SQL
        (*params, message_id),
    )
    if cur.rowcount == 0:
        raise LookupError(f"no outbox message {message_id}")


async def count_pending_outbox(conn: Conn, *, job_id: str | None) -> int:
    """Pending rows of one job, or of all jobs when `job_id` is None."""
    if job_id is None:
        cur = await conn.execute("SELECT COUNT(*) AS n FROM outbox WHERE status = 'pending'")
    else:
        cur = await conn.execute(
            "SELECT COUNT(*) AS n FROM outbox WHERE status = 'pending' AND job_id = %s", (job_id,)
        )
    row = await cur.fetchone()
    return int(row["n"]) if row is not None else 0


async def ready_jobs_delivered(conn: Conn, *, limit: int) -> list[Job]:
    """`ready` jobs none of whose outbox rows is pending, oldest first."""
    cur = await conn.execute(
        f"{_JOB_SELECT} WHERE state = %s AND NOT EXISTS"  # noqa: S608 - constant SQL
        " (SELECT 1 FROM outbox o WHERE o.job_id = jobs.job_id AND o.status = 'pending')"
        " ORDER BY created_at, seq LIMIT %s",
        (JobState.READY.value, limit),
    )
    return [job_from_row(r) for r in await cur.fetchall()]


# --- housekeeping -----------------------------------------------------------------------


async def purge_events(conn: Conn, *, older_than: float, limit: int) -> int:
    """Delete up to `limit` old events whose jobs are all finished, with those jobs."""
    cur = await conn.execute(
        "SELECT e.id FROM events e WHERE e.received_at < %s AND NOT EXISTS ("
        "  SELECT 1 FROM jobs j WHERE j.event_row = e.id AND ("
        "   j.state <> ALL(%s) OR EXISTS ("
        "     SELECT 1 FROM outbox o WHERE o.job_id = j.job_id AND o.status <> 'delivered')))"
        " ORDER BY e.id LIMIT %s FOR UPDATE SKIP LOCKED",
        (older_than, _TERMINAL, limit),
    )
    ids = [r["id"] for r in await cur.fetchall()]
    if not ids:
        return 0
    jobs_of = "SELECT job_id FROM jobs WHERE event_row = ANY(%s)"
    await conn.execute(f"DELETE FROM outbox WHERE job_id IN ({jobs_of})", (ids,))  # noqa: S608 - constant SQL
    await conn.execute(f"DELETE FROM transitions WHERE job_id IN ({jobs_of})", (ids,))  # noqa: S608 - constant SQL
    await conn.execute("DELETE FROM jobs WHERE event_row = ANY(%s)", (ids,))
    await conn.execute("DELETE FROM events WHERE id = ANY(%s)", (ids,))
    return len(ids)


async def heartbeat(conn: Conn, *, now: float) -> None:
    """A real write, so `ping` proves the database takes commits, not just reads."""
    await conn.execute(
        "INSERT INTO heartbeat (id, at) VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET at = %s",
        (now, now),
    )


# --- operator console reads -------------------------------------------------------------


async def count_events_by_status(conn: Conn) -> dict[EventStatus, int]:
    """Every status with its count, zero included."""
    counts = dict.fromkeys(EventStatus, 0)
    cur = await conn.execute("SELECT status, COUNT(*) AS n FROM events GROUP BY status")
    for row in await cur.fetchall():
        counts[EventStatus(row["status"])] = row["n"]
    return counts


async def jobs_of_event(conn: Conn, *, event_row: int) -> list[Job]:
    """The jobs one inbox row became, in the order they were created."""
    cur = await conn.execute(f"{_JOB_SELECT} WHERE event_row = %s ORDER BY seq", (event_row,))
    return [job_from_row(r) for r in await cur.fetchall()]


async def job_announcements(conn: Conn, *, job_id: str) -> list[Announcement]:
    """Every outbox row of one job, every round and target, oldest first."""
    cur = await conn.execute(
        f"SELECT {_OUTBOX_COLS}, created_at, delivered_at FROM outbox WHERE job_id = %s"  # noqa: S608 - constant SQL
        " ORDER BY id",
        (job_id,),
    )
    return [
        Announcement(
            message=_outbox_from_row(r), created_at=r["created_at"], delivered_at=r["delivered_at"]
        )
        for r in await cur.fetchall()
    ]


async def count_outbox_by_status(conn: Conn) -> dict[str, int]:
    """Outbox rows by status, zeros included."""
    counts = dict.fromkeys(("pending", "delivered", "dead"), 0)
    cur = await conn.execute("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
    for row in await cur.fetchall():
        counts[row["status"]] = row["n"]
    return counts


async def activity_per_minute(conn: Conn, *, since: float) -> list[MinuteActivity]:
    """Events received and videos made ready per minute since `since`; empty minutes left out."""
    minutes: dict[int, list[int]] = {}
    for column, table, index in (("received_at", "events", 0), ("ready_at", "jobs", 1)):
        cur = await conn.execute(
            f"SELECT CAST(trunc({column} / %s) AS BIGINT) AS m, COUNT(*) AS n FROM {table}"  # noqa: S608 - constant names above
            f" WHERE {column} >= %s GROUP BY m",
            (_MINUTE_S, since),
        )
        for row in await cur.fetchall():
            minutes.setdefault(row["m"], [0, 0])[index] = row["n"]
    return [
        MinuteActivity(minute=float(m * _MINUTE_S), events=counts[0], videos=counts[1])
        for m, counts in sorted(minutes.items())
    ]


async def exports_by_route(conn: Conn, *, since: float) -> dict[str, int]:
    """Exports billed since `since`, per route: one per move into `submitted`."""
    cur = await conn.execute(
        "SELECT j.route AS route, COUNT(*) AS n FROM transitions t"
        " JOIN jobs j ON j.job_id = t.job_id"
        " WHERE t.to_state = %s AND t.at >= %s GROUP BY j.route",
        (JobState.SUBMITTED.value, since),
    )
    return {r["route"]: r["n"] for r in await cur.fetchall()}


async def count_jobs_by_route(conn: Conn) -> dict[str, dict[JobState, int]]:
    """Jobs per route and state (only the states a route has jobs in)."""
    counts: dict[str, dict[JobState, int]] = {}
    cur = await conn.execute("SELECT route, state, COUNT(*) AS n FROM jobs GROUP BY route, state")
    for row in await cur.fetchall():
        counts.setdefault(row["route"], {})[JobState(row["state"])] = row["n"]
    return counts
