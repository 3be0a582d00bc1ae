"""The shared store: PostgreSQL, so several studiohook instances can work on one database.

psycopg 3 with `psycopg_pool`: native asyncio (no threads in between, unlike SQLite here),
server-side parameter binding, and a maintained pool that checks connections and replaces
broken ones. Every store call runs in its own transaction and returns only after COMMIT, with
PostgreSQL's default `synchronous_commit = on`: what the call acknowledged survives a crash of
the server, the same durability contract as the SQLite engine. PostgreSQL batches the WAL
flushes of concurrent commits itself, so no group-commit writer is needed here.

Instances never coordinate in memory: rows they decide on are locked for the transaction,
claims skip rows others hold, and commits that create work NOTIFY the other instances.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

import anyio
import anyio.abc
import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row

from service.log import get_logger
from service.model import (
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
    SpendCap,
    StoredEvent,
    Transition,
)
from service.store import postgres_sql as sql
from service.store.base import StoreUnavailableError
from service.store.methods import OutboxListeners
from service.store.postgres_lock import PostgresSessionLock
from service.store.postgres_schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    SCHEMA_VERSION,
    VERSION_TABLE,
)

T = TypeVar("T")
Conn = AsyncConnection[DictRow]

_log = get_logger("store.postgres")
_PURGE_CHUNK = 500
_LISTEN_RETRY_S = 1.0
_ATTEMPTS = 3
"""Tries of a transaction PostgreSQL aborted to break a deadlock or a serialisation conflict."""


OUTBOX_CLAIM_S = 30.0
"""How long an outbox scan claims its rows for its instance unless the sender renews them.

Not the job lease (`[service] lease_seconds`, which may be 1 s): a job claim is fenced, so a
lapse while its owner stalls costs nothing, but nothing fences an announcement, so a lapsed
outbox claim is a second instance sending the same round. A long claim makes a stall of the
sender harmless; a dead instance's announcements wait this long, and a restarted instance
(same id) takes its own back at once.
"""


class SchemaTooNewError(StoreUnavailableError):
    """The database was migrated by a newer studiohook: running on it could corrupt it."""


class PostgresStore(OutboxListeners):
    """The Store protocol on a PostgreSQL database; see the module docstring.

    With `outbox_claimant` (the instance id; the app sets it), `due_outbox` claims the rows it
    returns for `outbox_lease_s` (renewed by the sender while it sends them), so instances
    sharing the database do not both send them.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout_s: float = 10.0,
        outbox_claimant: str | None = None,
        outbox_lease_s: float = OUTBOX_CLAIM_S,
    ) -> None:
        super().__init__()
        self._url = url
        self._clock = clock
        self._min = min_connections
        self._max = max_connections
        self._timeout_s = connect_timeout_s
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None
        self._closed = False
        self._work_listeners: list[Callable[[], None]] = []
        self._outbox_claimant = outbox_claimant
        self._outbox_lease_s = outbox_lease_s

    @property
    def url(self) -> str:
        """The connection URL (may hold a password: never log it)."""
        return self._url

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, then create or migrate the schema; refuse a schema newer than this code."""
        if self._pool is not None or self._closed:
            raise RuntimeError("a PostgresStore is opened once")
        pool = psycopg_pool.AsyncConnectionPool(
            self._url,
            min_size=self._min,
            max_size=self._max,
            timeout=self._timeout_s,
            connection_class=AsyncConnection[DictRow],
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(self._timeout_s))},
            open=False,
            name="studiohook",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout_s)
            async with pool.connection() as conn:
                await _migrate(conn)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
                raise StoreUnavailableError(f"cannot open the PostgreSQL store: {exc}") from exc
            raise
        self._pool = pool
        _log.info("store_opened", engine="postgresql", schema_version=SCHEMA_VERSION)

    async def close(self) -> None:
        """Wait for transactions in flight, then close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            await self._pool.close()

    # --- plumbing -------------------------------------------------------------------------

    async def _run(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `work` in one transaction and return once it is committed.

        A deadlock or serialisation failure rolled everything back, so the transaction is run
        again; a lost or refused connection is StoreUnavailableError (answer 503, ack nothing).
        """
        for attempt in range(1, _ATTEMPTS + 1):
            if self._pool is None or self._closed:
                raise StoreUnavailableError("store is not open")
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    return await work(conn)
            except psycopg.errors.TransactionRollback as exc:
                if attempt == _ATTEMPTS:
                    raise StoreUnavailableError(f"cannot commit: {exc}") from exc
                _log.warning("store_transaction_retried", error=str(exc), attempt=attempt)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise StoreUnavailableError(f"cannot commit: {exc}") from exc
            except psycopg_pool.PoolClosed as exc:
                raise StoreUnavailableError("store is closed") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- intake ---------------------------------------------------------------------------

    async def accept_event(self, event: InboundEvent, jobs: Sequence[NewJob]) -> Acceptance:
        """Commit an event and its jobs, or return the original ids of a duplicate."""
        now = self._clock()
        return await self._run(
            functools.partial(sql.accept_event, event=event, jobs=tuple(jobs), now=now)
        )

    async def reject_event(self, event: InboundEvent, reason: str) -> Acceptance:
        """Commit an unusable event as a dead letter; dedupe applies as for accepted ones."""
        rejected = dataclasses.replace(event, reason=reason)
        return await self._run(
            functools.partial(sql.accept_event, event=rejected, jobs=(), now=0.0)
        )

    async def get_event(self, row: int) -> StoredEvent | None:
        """Read one inbox row."""
        return await self._run(functools.partial(sql.get_event, row=row))

    async def get_events(self, rows: Collection[int]) -> dict[int, StoredEvent]:
        """Read many inbox rows in one go."""
        if not rows:
            return {}
        return await self._run(functools.partial(sql.get_events, rows=tuple(rows)))

    async def list_events(
        self,
        *,
        status: EventStatus | None = None,
        source: str | None = None,
        since: float | None = None,
        event_id: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
    ) -> list[StoredEvent]:
        """A page of inbox rows, newest first, below row id `cursor`."""
        return await self._run(
            functools.partial(
                sql.list_events,
                status=status,
                source=source,
                since=since,
                event_id=event_id,
                limit=limit,
                cursor=cursor,
            )
        )

    async def replay_event(self, row: int, decided: InboundEvent, jobs: Sequence[NewJob]) -> Replay:
        """Re-decide a stored event and add the jobs it lacks, in one commit."""
        return await self._run(
            functools.partial(
                sql.replay_event, row=row, decided=decided, jobs=tuple(jobs), now=self._clock()
            )
        )

    # --- jobs -----------------------------------------------------------------------------

    async def transition(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        update: JobUpdate | None = None,
        outbox: Sequence[NewOutboxMessage] = (),
        *,
        fence: int | None = None,
    ) -> Job:
        """Compare-and-set the state (and fence) with history and outbox rows, atomically."""
        job = await self._run(
            functools.partial(
                sql.transition,
                job_id=job_id,
                from_states=frozenset(from_states),
                to_state=to_state,
                update=update,
                outbox=tuple(outbox),
                now=self._clock(),
                fence=fence,
            )
        )
        if outbox:
            self._outbox_committed()
        return job

    async def map_jobs(self, mapped: Sequence[tuple[str, JobUpdate]]) -> list[str]:
        """`received -> mapped` for a batch of jobs in one transaction."""
        if not mapped:
            return []
        return await self._run(
            functools.partial(sql.map_jobs, mapped=tuple(mapped), now=self._clock())
        )

    def add_work_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` when any instance on this database committed new jobs (via `listen`)."""
        self._work_listeners.append(listener)

    async def listen(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Forever: wake this instance's loops when any instance commits work (LISTEN/NOTIFY).

        Idle instances learn of jobs another instance accepted, and of announcements to send,
        at once instead of by polling. A lost connection is retried every second; after a
        reconnect every listener is called, since notifications sent meanwhile are gone.
        """
        reported = False
        while True:
            try:
                conn = await AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=max(1, int(self._timeout_s))
                )
                async with conn:
                    await conn.execute(f"LISTEN {sql.JOBS_CHANNEL}")
                    await conn.execute(f"LISTEN {sql.OUTBOX_CHANNEL}")
                    if reported:
                        self._notified(sql.JOBS_CHANNEL)
                        self._notified(sql.OUTBOX_CHANNEL)
                    else:
                        task_status.started()
                        reported = True
                    async for notification in conn.notifies():
                        self._notified(notification.channel)
            except psycopg.OperationalError as exc:
                _log.warning("store_listen_lost", error=str(exc))
                if not reported:
                    task_status.started()
                    reported = True
                await anyio.sleep(_LISTEN_RETRY_S)

    def _notified(self, channel: str) -> None:
        listeners = self._work_listeners if channel == sql.JOBS_CHANNEL else self._outbox_listeners
        for listener in listeners:
            listener()

    async def update_job(self, job_id: str, update: JobUpdate, *, fence: int | None = None) -> Job:
        """Change fields without a state change; UnknownJobError for a missing job."""
        return await self._run(
            functools.partial(
                sql.update_job, job_id=job_id, update=update, now=self._clock(), fence=fence
            )
        )

    async def claim_job(
        self, job_id: str, states: Collection[JobState], *, owner: str, lease_s: float
    ) -> Job | None:
        """Claim one free job for `owner` (see the Store protocol)."""
        now = self._clock()
        return await self._run(
            functools.partial(
                sql.claim_job,
                job_id=job_id,
                states=frozenset(states),
                owner=owner,
                lease_until=now + lease_s,
                now=now,
            )
        )

    async def claim_jobs(
        self,
        states: Collection[JobState],
        *,
        owner: str,
        lease_s: float,
        limit: int,
        take_own: bool = True,
    ) -> list[Job]:
        """Claim up to `limit` free jobs, oldest first, skipping rows others hold right now."""
        now = self._clock()
        return await self._run(
            functools.partial(
                sql.claim_jobs,
                states=frozenset(states),
                owner=owner,
                lease_until=now + lease_s,
                now=now,
                limit=limit,
                take_own=take_own,
            )
        )

    async def spend_or_hold(
        self,
        job_id: str,
        caps: Sequence[SpendCap],
        update: JobUpdate,
        announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
        *,
        fence: int | None = None,
    ) -> Job:
        """Commit the paid call with its spend record, or hold the job (see the Store protocol)."""
        job = await self._run(
            functools.partial(
                sql.spend_or_hold,
                job_id=job_id,
                caps=tuple(caps),
                update=update,
                announce=announce,
                now=self._clock(),
                fence=fence,
            )
        )
        if job.state is JobState.HELD:
            self._outbox_committed()
        return job

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        """The latest exported job with this render key ready since `since` (render cache)."""
        return await self._run(
            functools.partial(sql.cached_render, render_key=render_key, since=since)
        )

    async def map_coalesced(
        self,
        job_id: str,
        update: JobUpdate,
        announce: Callable[[Job], Sequence[NewOutboxMessage]],
    ) -> Job:
        """Map a coalescing job and supersede the older waiting jobs of its key, atomically."""
        job = await self._run(
            functools.partial(
                sql.map_coalesced,
                job_id=job_id,
                update=update,
                announce=announce,
                now=self._clock(),
            )
        )
        self._outbox_committed()
        return job

    async def spend_counts(self, since: float) -> dict[str, int]:
        """Paid calls recorded since `since`, per route."""
        return await self._run(functools.partial(sql.spend_counts, since=since))

    async def save_render_estimate(self, key: str, seconds: float) -> None:
        """Keep the learned render time of `key` across restarts."""
        await self._run(
            functools.partial(sql.save_render_estimate, key=key, seconds=seconds, now=self._clock())
        )

    async def render_estimates(self) -> dict[str, float]:
        """Every learned render time by key."""
        return await self._run(sql.render_estimates)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        """Extend every lease `owner` holds to now + `lease_s`."""
        return await self._run(
            functools.partial(sql.renew_leases, owner=owner, lease_until=self._clock() + lease_s)
        )

    async def get_job(self, job_id: str) -> Job | None:
        """Read one job."""
        return await self._run(functools.partial(sql.get_job, job_id=job_id))

    async def jobs_in_states(self, states: Collection[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of these states, oldest first."""
        return await self._run(
            functools.partial(sql.jobs_in_states, states=frozenset(states), limit=limit)
        )

    async def list_jobs(
        self,
        *,
        state: JobState | None = None,
        route: str | None = None,
        limit: int = 50,
        after: str | None = None,
        source: str | None = None,
        created_since: float | None = None,
    ) -> list[Job]:
        """A page of jobs, newest first, continuing after job id `after`."""
        return await self._run(
            functools.partial(
                sql.list_jobs,
                state=state,
                route=route,
                limit=limit,
                after=after,
                source=source,
                created_since=created_since,
            )
        )

    async def job_history(self, job_id: str) -> list[Transition]:
        """Every transition of one job, in order."""
        return await self._run(functools.partial(sql.job_history, job_id=job_id))

    async def job_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        """Up to `limit` job ids starting with `prefix`, sorted."""
        return await self._run(
            functools.partial(sql.job_ids_with_prefix, prefix=prefix, limit=limit)
        )

    async def count_jobs_by_state(self) -> dict[JobState, int]:
        """Every state with its job count, zeros included."""
        return await self._run(sql.count_jobs_by_state)

    # --- outbox ---------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int = 100) -> list[OutboxMessage]:
        """Pending outbox rows due at `now`, oldest first."""
        return await self._run(
            functools.partial(
                sql.due_outbox,
                now=now,
                limit=limit,
                claimant=self._outbox_claimant,
                lease_until=now + self._outbox_lease_s,
            )
        )

    async def renew_outbox_claims(self, message_ids: Collection[int], now: float) -> None:
        """Extend this instance's claim on the rows it is still sending by its lease."""
        if self._outbox_claimant is None or not message_ids:
            return
        await self._run(
            functools.partial(
                sql.renew_outbox_claims,
                message_ids=sorted(message_ids),
                claimant=self._outbox_claimant,
                lease_until=now + self._outbox_lease_s,
            )
        )

    async def outbox_delivered(self, message_id: int) -> None:
        """Mark one outbox row delivered."""
        await self._run(
            functools.partial(
                sql.update_outbox,
                message_id=message_id,
                assignments="status = 'delivered', delivered_at = %s",
                params=(self._clock(),),
            )
        )

    async def outbox_retry(self, message_id: int, next_attempt_at: float, error: str) -> None:
        """Count a failed attempt and schedule the next one."""
        await self._run(
            functools.partial(
                sql.update_outbox,
                message_id=message_id,
                assignments="attempts = attempts + 1, next_attempt_at = %s, last_error = %s,"
                " claimed_by = NULL, claimed_until = NULL",
                params=(next_attempt_at, error),
            )
        )

    async def outbox_dead(self, message_id: int, error: str) -> None:
        """Count the final failed attempt and give up; the row is kept for inspection."""
        await self._run(
            functools.partial(
                sql.update_outbox,
                message_id=message_id,
                assignments="status = 'dead', attempts = attempts + 1, last_error = %s",
                params=(error,),
            )
        )

    async def outbox_pending_for_job(self, job_id: str) -> int:
        """How many outbox rows of this job are still pending."""
        return await self._run(functools.partial(sql.count_pending_outbox, job_id=job_id))

    async def ready_jobs_delivered(self, limit: int) -> list[Job]:
        """`ready` jobs with no pending outbox row, oldest first."""
        return await self._run(functools.partial(sql.ready_jobs_delivered, limit=limit))

    async def outbox_backlog(self) -> int:
        """How many outbox rows are pending."""
        return await self._run(functools.partial(sql.count_pending_outbox, job_id=None))

    # --- housekeeping ---------------------------------------------------------------------

    async def purge_dedupe(self, older_than: float) -> int:
        """Forget old finished events and their jobs, in chunks of one commit each."""
        purged = 0
        while True:
            chunk = await self._run(
                functools.partial(sql.purge_events, older_than=older_than, limit=_PURGE_CHUNK)
            )
            purged += chunk
            if chunk < _PURGE_CHUNK:
                return purged

    async def ping(self) -> None:
        """Commit a heartbeat row: proves the database takes durable writes right now."""
        await self._run(functools.partial(sql.heartbeat, now=self._clock()))

    def exclusive_lock(self, name: str, *, lapse_s: float) -> PostgresSessionLock:
        """A session-level advisory lock on a connection of its own (see `postgres_lock`)."""
        return PostgresSessionLock(
            self._url, name, lapse_s=lapse_s, connect_timeout_s=self._timeout_s
        )

    # --- operator console reads -----------------------------------------------------------

    async def count_events_by_status(self) -> dict[EventStatus, int]:
        """Inbox rows by status, zeros included."""
        return await self._run(sql.count_events_by_status)

    async def jobs_of_event(self, event_row: int) -> list[Job]:
        """The jobs one inbox row became."""
        return await self._run(functools.partial(sql.jobs_of_event, event_row=event_row))

    async def job_announcements(self, job_id: str) -> list[Announcement]:
        """Every outbox row of one job with its delivery record."""
        return await self._run(functools.partial(sql.job_announcements, job_id=job_id))

    async def count_outbox_by_status(self) -> dict[str, int]:
        """Outbox rows by status."""
        return await self._run(sql.count_outbox_by_status)

    async def activity_per_minute(self, since: float) -> list[MinuteActivity]:
        """Events received and videos made ready per minute since `since`."""
        return await self._run(functools.partial(sql.activity_per_minute, since=since))

    async def exports_by_route(self, since: float) -> dict[str, int]:
        """Paid exports accepted by the API since `since`, per route."""
        return await self._run(functools.partial(sql.exports_by_route, since=since))

    async def count_jobs_by_route(self) -> dict[str, dict[JobState, int]]:
        """Jobs per route and state."""
        return await self._run(sql.count_jobs_by_route)


async def _migrate(conn: Conn) -> None:
    """Bring the schema to SCHEMA_VERSION under an advisory lock, in one transaction.

    PostgreSQL's DDL is transactional: a migration that fails leaves the previous version
    whole, and instances starting together wait on the lock and then find nothing to do.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(VERSION_TABLE)
        cur = await conn.execute("SELECT version FROM studiohook_schema WHERE id = 1")
        row = await cur.fetchone()
        version = int(row["version"]) if row is not None else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"database schema version {version} is newer than this studiohook knows"
                f" ({SCHEMA_VERSION}): upgrade studiohook or use another database"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO studiohook_schema (id, version) VALUES (1, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )
    if version < SCHEMA_VERSION:
        _log.info("store_migrated", engine="postgresql", from_version=version, to=SCHEMA_VERSION)
