"""The embedded store: one SQLite file in WAL mode, durable on every acknowledged commit.

Writes go through one writer thread with group commit (see `writer.py`): `synchronous=FULL`
costs an fsync per commit, and batching is what lets a burst of webhooks share it. The WAL is
copied back into the database file by a checkpointer thread beside it (`checkpointer.py`), not
inside the writer's commits. Reads use a
small pool of read-only connections on worker threads; WAL lets them run while the writer
commits, so the admin API and the work queues never wait behind an fsync (measured on 2 cores:
reads p50 0.2 ms / p99 4 ms during a burst of 500 intakes, which committed in a handful of
transactions).
"""

from __future__ import annotations

import functools
import queue
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import anyio

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
from service.store import sqlite_reads as reads
from service.store import sqlite_sql as sql
from service.store.base import SoleProcessLock, StoreUnavailableError
from service.store.checkpointer import Checkpointer
from service.store.methods import OutboxListeners
from service.store.schema import MIGRATIONS, PRECHECKS, SCHEMA_VERSION
from service.store.writer import GroupCommitWriter, is_database_failure

T = TypeVar("T")

_log = get_logger("store.sqlite")
_PURGE_CHUNK = 500
WRITER_CACHE_KIB = 64 * 1024
"""The writer connection's page cache, at most (it grows with use): 64 MiB instead of 2 MiB
took bench/intake.py's CPU per webhook from 0.33-0.39 to 0.26-0.36 ms (4 alternating runs)."""
WRITER_CACHED_STATEMENTS = 256
"""Prepared statements the write connection keeps (sqlite3's default is 128): intake's
multi-row INSERTs alone are up to 83 sizes into `intake_rows` and 19 for each of three tables
(groups with a duplicate), and every other write statement of the daemon should stay prepared
beside them."""


class SQLiteStore(OutboxListeners):
    """The Store protocol on one SQLite file; see the module docstring for the threading."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_batch: int = 256,
        readers: int = 2,
        busy_timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self._path = Path(path)
        self._clock = clock
        self._max_batch = max_batch
        self._reader_count = readers
        self._busy_timeout_s = busy_timeout_s
        self._writer: GroupCommitWriter | None = None
        self._checkpointer: Checkpointer | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_limiter = anyio.CapacityLimiter(readers)
        self._closed = False

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def commit_count(self) -> int:
        """Transactions committed since open: shows group commit at work."""
        return self._writer.commit_count if self._writer else 0

    @property
    def write_count(self) -> int:
        """Write requests committed since open."""
        return self._writer.write_count if self._writer else 0

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and schema (or migrate it) and start the writer thread."""
        if self._writer is not None or self._closed:
            raise RuntimeError("a SQLiteStore is opened once")
        try:
            connection = await anyio.to_thread.run_sync(self._open_writer_connection)
            for _ in range(self._reader_count):
                self._readers.put(await anyio.to_thread.run_sync(self._open_reader_connection))
        except (sqlite3.Error, OSError) as exc:
            self._close_readers()
            raise StoreUnavailableError(f"cannot open {self._path}: {exc}") from exc
        checkpointer = Checkpointer(self._open_checkpoint_connection)
        self._writer = GroupCommitWriter(
            connection,
            max_batch=self._max_batch,
            after_batch=checkpointer.after_batch,
        )
        self._checkpointer = checkpointer
        checkpointer.start()
        self._writer.start()
        _log.info("store_opened", path=str(self._path), schema_version=SCHEMA_VERSION)

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close every connection."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._writer is not None:
                await self._writer.stop()
            if self._checkpointer is not None:
                await anyio.to_thread.run_sync(self._checkpointer.stop)
            await anyio.to_thread.run_sync(
                functools.partial(self._close_readers, wait=self._writer is not None)
            )

    def _connect(self, *, cached_statements: int = 128) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=cached_statements,
        )
        connection.row_factory = sqlite3.Row
        return connection

    def _open_writer_connection(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connect(cached_statements=WRITER_CACHED_STATEMENTS)
        try:
            _require_wal(connection)
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            # The checkpointer copies the WAL back beside the writer, not inside its commits.
            connection.execute("PRAGMA wal_autocheckpoint=0")
            # A multi-row INSERT keeps a statement journal; in memory it is no temp file each.
            connection.execute("PRAGMA temp_store=MEMORY")
            # Each delivery inserts into two indexes at random places (dedupe key, job id);
            # with SQLite's 2 MB default those pages are read again from the OS.
            connection.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            _migrate(connection)
            sql.prepare_writer(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _open_checkpoint_connection(self) -> sqlite3.Connection:
        connection = self._connect()
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def _open_reader_connection(self) -> sqlite3.Connection:
        connection = self._connect()
        connection.execute("PRAGMA query_only=ON")
        return connection

    def _close_readers(self, *, wait: bool = False) -> None:
        """Take every reader back (waiting for reads in flight if asked) and close it."""
        for _ in range(self._reader_count):
            try:
                if wait:
                    connection = self._readers.get(timeout=self._busy_timeout_s + 1.0)
                else:
                    connection = self._readers.get_nowait()
            except queue.Empty:
                return
            connection.close()

    # --- plumbing -------------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailableError("store is not open")
        return await self._writer.submit(work)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._read_limiter:
            if self._closed or self._writer is None:
                raise StoreUnavailableError("store is closed")
            connection = self._readers.get_nowait()
            try:
                return await anyio.to_thread.run_sync(_run_read, work, connection)
            finally:
                self._readers.put(connection)

    # --- intake ---------------------------------------------------------------------------

    async def accept_event(self, event: InboundEvent, jobs: Sequence[NewJob]) -> Acceptance:
        """Commit an event and its jobs, or return the original ids of a duplicate."""
        now = self._clock()
        if self._writer is None:
            raise StoreUnavailableError("store is not open")
        return await self._writer.submit(
            functools.partial(sql.accept_event, event=event, jobs=jobs, now=now),
            grouped=sql.accept_events,
            at_once=sql.accept_events_at_once,
            item=sql.accept_item(event, tuple(jobs), now),
        )

    async def reject_event(self, event: InboundEvent, reason: str) -> Acceptance:
        """Commit an unusable event as a dead letter; dedupe applies as for accepted ones."""
        return await self._write(functools.partial(sql.reject_event, event=event, reason=reason))

    async def get_event(self, row: int) -> StoredEvent | None:
        """Read one inbox row."""
        return await self._read(functools.partial(sql.get_event, row=row))

    async def get_events(self, rows: Collection[int]) -> dict[int, StoredEvent]:
        """Read many inbox rows in one go."""
        if not rows:
            return {}
        return await self._read(functools.partial(sql.get_events, rows=tuple(rows)))

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
        return await self._read(
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
        return await self._write(
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
        """Compare-and-set the state with its history row and outbox rows, atomically.

        Raises StaleTransitionError (UnknownJobError for a missing job); an outbox row that
        already exists for (job, target, event type, round) is not inserted again. A move that
        `ALLOWED_TRANSITIONS` does not list, or an outbox row of another round than the job's
        export name, is a bug in the caller: ValueError, nothing written.
        """
        work = functools.partial(
            sql.transition,
            job_id=job_id,
            from_states=frozenset(from_states),
            to_state=to_state,
            update=update,
            outbox=tuple(outbox),
            now=self._clock(),
            fence=fence,
        )
        job: Job = await self._write(work)
        if outbox:
            self._outbox_committed()
        return job

    async def map_jobs(self, mapped: Sequence[tuple[str, JobUpdate]]) -> list[str]:
        """`received -> mapped` for a batch of jobs in one writer request (one transaction)."""
        if not mapped:
            return []
        moved: list[str] = await self._write(
            functools.partial(sql.map_jobs, mapped=tuple(mapped), now=self._clock())
        )
        return moved

    async def update_job(self, job_id: str, update: JobUpdate, *, fence: int | None = None) -> Job:
        """Change fields without a state change; UnknownJobError for a missing job."""
        return await self._write(
            functools.partial(
                sql.update_job, job_id=job_id, update=update, now=self._clock(), fence=fence
            )
        )

    async def claim_job(
        self, job_id: str, states: Collection[JobState], *, owner: str, lease_s: float
    ) -> Job | None:
        """Claim one free job for `owner` (see the Store protocol)."""
        now = self._clock()
        return await self._write(
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
        """Claim up to `limit` free jobs, oldest first (see the Store protocol)."""
        now = self._clock()
        return await self._write(
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
        job: Job = await self._write(
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
        return await self._read(
            functools.partial(sql.cached_render, render_key=render_key, since=since)
        )

    async def map_coalesced(
        self,
        job_id: str,
        update: JobUpdate,
        announce: Callable[[Job], Sequence[NewOutboxMessage]],
    ) -> Job:
        """Map a coalescing job and supersede the older waiting jobs of its key, atomically."""
        job: Job = await self._write(
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
        return await self._read(functools.partial(sql.spend_counts, since=since))

    async def save_render_estimate(self, key: str, seconds: float) -> None:
        """Keep the learned render time of `key` across restarts."""
        await self._write(
            functools.partial(sql.save_render_estimate, key=key, seconds=seconds, now=self._clock())
        )

    async def render_estimates(self) -> dict[str, float]:
        """Every learned render time by key."""
        return await self._read(sql.render_estimates)

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        """Extend every lease `owner` holds to now + `lease_s`."""
        return await self._write(
            functools.partial(sql.renew_leases, owner=owner, lease_until=self._clock() + lease_s)
        )

    async def get_job(self, job_id: str) -> Job | None:
        """Read one job."""
        return await self._read(functools.partial(sql.get_job, job_id=job_id))

    async def jobs_in_states(self, states: Collection[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of these states, oldest first."""
        return await self._read(
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
        return await self._read(
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
        return await self._read(functools.partial(sql.job_history, job_id=job_id))

    async def job_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        """Up to `limit` job ids starting with `prefix`, sorted."""
        return await self._read(
            functools.partial(sql.job_ids_with_prefix, prefix=prefix, limit=limit)
        )

    async def count_jobs_by_state(self) -> dict[JobState, int]:
        """Every state with its job count, zeros included."""
        return await self._read(sql.count_jobs_by_state)

    # --- outbox ---------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int = 100) -> list[OutboxMessage]:
        """Pending outbox rows due at `now`, oldest first."""
        return await self._read(functools.partial(sql.due_outbox, now=now, limit=limit))

    async def renew_outbox_claims(self, message_ids: Collection[int], now: float) -> None:
        """Nothing to renew: one process owns a SQLite store, so its rows are never claimed."""

    async def outbox_delivered(self, message_id: int) -> None:
        """Mark one outbox row delivered."""
        await self._write(
            functools.partial(sql.outbox_delivered, message_id=message_id, now=self._clock())
        )

    async def outbox_retry(self, message_id: int, next_attempt_at: float, error: str) -> None:
        """Count a failed attempt and schedule the next one."""
        await self._write(
            functools.partial(
                sql.outbox_retry,
                message_id=message_id,
                next_attempt_at=next_attempt_at,
                error=error,
            )
        )

    async def outbox_dead(self, message_id: int, error: str) -> None:
        """Count the final failed attempt and give up; the row is kept for inspection."""
        await self._write(functools.partial(sql.outbox_dead, message_id=message_id, error=error))

    async def outbox_pending_for_job(self, job_id: str) -> int:
        """How many outbox rows of this job are still pending."""
        return await self._read(functools.partial(sql.count_pending_outbox, job_id=job_id))

    async def ready_jobs_delivered(self, limit: int) -> list[Job]:
        """`ready` jobs with no pending outbox row, oldest first."""
        return await self._read(functools.partial(sql.ready_jobs_delivered, limit=limit))

    async def outbox_backlog(self) -> int:
        """How many outbox rows are pending."""
        return await self._read(functools.partial(sql.count_pending_outbox, job_id=None))

    # --- housekeeping ---------------------------------------------------------------------

    async def purge_dedupe(self, older_than: float) -> int:
        """Forget events received before `older_than` whose jobs are all finished.

        The caller guarantees `older_than` is at least 7 days ago, longer than any sender
        retries a delivery. Finished means terminal with every outbox row delivered (a dead
        row keeps its job and event for inspection). Events without jobs (ignored, rejected)
        go too. Works in chunks, one commit each, so intake is never stalled behind it.
        """
        purged = 0
        while True:
            chunk = await self._write(
                functools.partial(sql.purge_events, older_than=older_than, limit=_PURGE_CHUNK)
            )
            purged += chunk
            if chunk < _PURGE_CHUNK:
                return purged

    async def ping(self) -> None:
        """Commit a heartbeat row: proves the database takes durable writes right now."""
        await self._write(functools.partial(sql.heartbeat, now=self._clock()))

    def exclusive_lock(self, name: str, *, lapse_s: float) -> SoleProcessLock:  # noqa: ARG002
        """One process owns a SQLite store: its locks are always held (see `SoleProcessLock`)."""
        return SoleProcessLock()

    # --- operator console reads -----------------------------------------------------------

    async def count_events_by_status(self) -> dict[EventStatus, int]:
        """Inbox rows by status, zeros included."""
        return await self._read(reads.count_events_by_status)

    async def jobs_of_event(self, event_row: int) -> list[Job]:
        """The jobs one inbox row became."""
        return await self._read(functools.partial(reads.jobs_of_event, event_row=event_row))

    async def job_announcements(self, job_id: str) -> list[Announcement]:
        """Every outbox row of one job with its delivery record."""
        return await self._read(functools.partial(reads.job_announcements, job_id=job_id))

    async def count_outbox_by_status(self) -> dict[str, int]:
        """Outbox rows by status."""
        return await self._read(reads.count_outbox_by_status)

    async def activity_per_minute(self, since: float) -> list[MinuteActivity]:
        """Events received and videos made ready per minute since `since`."""
        return await self._read(functools.partial(reads.activity_per_minute, since=since))

    async def exports_by_route(self, since: float) -> dict[str, int]:
        """Paid exports accepted by the API since `since`, per route."""
        return await self._read(functools.partial(reads.exports_by_route, since=since))

    async def count_jobs_by_route(self) -> dict[str, dict[JobState, int]]:
        """Jobs per route and state."""
        return await self._read(reads.count_jobs_by_route)


def _run_read(work: Callable[[sqlite3.Connection], T], connection: sqlite3.Connection) -> T:
    try:
        return work(connection)
    except sqlite3.Error as exc:
        if is_database_failure(exc):
            raise StoreUnavailableError(f"cannot read: {exc}") from exc
        raise


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; the version check runs inside the write lock."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(connection)
        for number, statements in enumerate(MIGRATIONS[version:], start=version):
            _precheck(connection, number)
            for statement in statements:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _precheck(connection: sqlite3.Connection, migration: int) -> None:
    check = PRECHECKS.get(migration)
    if check is None:
        return
    query, problem = check
    count = int(connection.execute(query).fetchone()[0])
    if count:
        raise sqlite3.DatabaseError(problem.format(count=count))


def _require_wal(connection: sqlite3.Connection) -> None:
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is required")


def _schema_version(connection: sqlite3.Connection) -> int:
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this studiohook knows ({SCHEMA_VERSION})"
        )
    return version
