"""The store port: everything studiohook must not forget, behind one Protocol.

Each method is one committed transaction. The engines (`sqlite.py`; PostgreSQL later) share
one contract test suite, so the jobs code never knows which it talks to.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

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


class StoreUnavailableError(Exception):
    """The store cannot commit right now (disk full, locked, closed): answer 503, never 2xx."""


class StaleTransitionError(Exception):
    """The job was not in any of the expected states: another path moved it first."""


class FencedError(StaleTransitionError):
    """The job was claimed again since this fence was handed out: the caller no longer owns it."""


class UnknownJobError(StaleTransitionError, LookupError):
    """The job does not exist (never did, or was purged): as stale as a moved job."""


class LockLostError(StoreUnavailableError):
    """The connection that held an exclusive lock broke or stopped answering: it is released."""


class ExclusiveLock(Protocol):
    """A lock at most one process on a store holds, kept only while its holder proves it lives.

    Several instances elect their one MQTT reader with it: the broker keeps one session per
    client id, so two readers would only take it from each other.
    """

    async def try_acquire(self) -> bool:
        """Take the lock when nobody holds it; False while another process does.

        StoreUnavailableError when the store cannot answer (nobody is known to hold it then).
        """

    async def check(self) -> None:
        """Prove the lock is still held; LockLostError (and the lock is let go) otherwise."""

    async def release(self) -> None:
        """Let the lock go (a no-op when not held); never raises."""


class SoleProcessLock:
    """The lock of a store only one process uses (SQLite): always held, never lost."""

    async def try_acquire(self) -> bool:
        """Always true: no other process shares this store."""
        return True

    async def check(self) -> None:
        """Nothing can take it away."""

    async def release(self) -> None:
        """Nothing to let go."""


class Store(Protocol):
    """Durable state: the inbox, the jobs with their history, and the outbox."""

    async def open(self) -> None:
        """Create or migrate the schema and start any background writer."""

    async def close(self) -> None:
        """Flush pending commits and release the database."""

    async def accept_event(self, event: InboundEvent, jobs: Sequence[NewJob]) -> Acceptance:
        """Commit an event and its jobs, or recognise it as a duplicate by (source, dedupe_key).

        Returns only after the commit is durable; concurrent callers share one commit. A
        duplicate returns the original event id and job ids with `duplicate=True`. An event
        with a `reason` is committed as a dead letter, with the jobs of the routes that worked.
        """

    async def reject_event(self, event: InboundEvent, reason: str) -> Acceptance:
        """Commit an event that could not be handled, as a dead letter kept for replay."""

    async def get_event(self, row: int) -> StoredEvent | None:
        """Read one inbox row."""

    async def get_events(self, rows: Collection[int]) -> dict[int, StoredEvent]:
        """Read many inbox rows in one go, by row id (rows that do not exist are absent).

        The mapper reads a whole batch's events at once instead of one round trip per job.
        """

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
        """A page of inbox rows, newest first, below row id `cursor` (the last page's end).

        `since` is unix seconds of receipt. The admin API, `studiohook events` and the console
        read dead letters through this.
        """

    async def replay_event(self, row: int, decided: InboundEvent, jobs: Sequence[NewJob]) -> Replay:
        """Commit what the current configuration makes of a stored event, in one transaction.

        The row takes `decided`'s identity and outcome (dead letter or not); each job is
        inserted unless a job with its id exists, which is reported instead (a replay never
        pays twice). LookupError when the row does not exist.
        """

    async def get_job(self, job_id: str) -> Job | None:
        """Read one job."""

    async def jobs_in_states(self, states: Collection[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of these states, oldest first: the work queues and recovery read these."""

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
        """A page of jobs for the admin API and console, newest first, after job id `after`.

        `source` and `created_since` (epoch seconds) narrow the page like `state` and `route`.
        """

    async def job_history(self, job_id: str) -> list[Transition]:
        """Every transition of one job, in order."""

    async def job_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        """Up to `limit` job ids starting with `prefix`, sorted: operators type short ids."""

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
        """Move a job, record the transition and insert outbox rows, in one transaction.

        With `fence`, the move is refused (FencedError) unless the job's fence is still that
        number: a worker whose claim was taken over can no longer move the job.

        Raises StaleTransitionError when the job is not in `from_states`, so two paths (a
        callback and a poll, say) can never both act on the same move. An outbox row is
        inserted once per (job, target, event type, round), the round being the job's export
        name: a replay cannot announce twice, a retried job announces its new outcome.
        """

    async def map_jobs(self, mapped: Sequence[tuple[str, JobUpdate]]) -> list[str]:
        """`received -> mapped` for many jobs, each with its update, in ONE transaction.

        Each move is recorded in the history as `transition` would; a job that is no longer
        `received` (another path moved it) is left as it is. Returns the ids moved, in order.
        Mapping in batches is how a sustained intake never builds a `received` backlog.
        """

    def add_outbox_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every commit that inserted outbox rows.

        The sender sleeps until then instead of polling the outbox.
        """

    async def update_job(self, job_id: str, update: JobUpdate, *, fence: int | None = None) -> Job:
        """Change fields without a state change (progress, poll counts); fenced as `transition`."""

    async def claim_job(
        self, job_id: str, states: Collection[JobState], *, owner: str, lease_s: float
    ) -> Job | None:
        """Claim one job in `states` for `owner` until now + `lease_s`, bumping its fence.

        Only a free job is claimed: never claimed, its lease expired, or already `owner`'s (a
        restarted worker takes its own jobs back at once). None when the job is not in `states`
        or another worker's lease still holds.
        """

    async def claim_jobs(
        self,
        states: Collection[JobState],
        *,
        owner: str,
        lease_s: float,
        limit: int,
        take_own: bool = True,
    ) -> list[Job]:
        """Claim up to `limit` free jobs in `states`, oldest first (recovery and take-over).

        `take_own=False` (a running worker's take-over scan) claims only jobs whose lease
        ended and that another worker, or nobody, held.
        """

    async def spend_or_hold(
        self,
        job_id: str,
        caps: Sequence[SpendCap],
        update: JobUpdate,
        announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
        *,
        fence: int | None = None,
    ) -> Job:
        """The paid call's commit under the spending caps, in ONE transaction.

        Counts the spend records under each cap (`at >= cap.since`, of `cap.route` when set);
        if all have room, moves the `mapped` job to `submitting` with `update` and records one
        spend row (job, route, export name, now). Otherwise moves it to `held` (error code
        `budget_exhausted`) and, the first time that cap's `period` is exhausted, inserts the
        rows `announce(held_job, cap)` returns. The count and the write must not interleave
        with another caller's: SQLite's single writer serialises them; another engine must
        lock (e.g. one advisory transaction lock) so concurrent workers never overshoot.
        Fenced and stale as `transition`. A move in `model.REFUNDING_MOVES` deletes the
        job's latest spend row inside `transition`'s transaction.
        """

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        """The render cache's lookup: the latest reusable job with `render_key`, or None.

        Reusable: itself exported (`reused_from` empty), `ready` or `notified` with a download
        URL, and `ready_at >= since`.
        """

    async def map_coalesced(
        self,
        job_id: str,
        update: JobUpdate,
        announce: Callable[[Job], Sequence[NewOutboxMessage]],
    ) -> Job:
        """Map a coalescing job, superseding the older waiting jobs of its key: ONE transaction.

        `received -> mapped` with `update` (whose `coalesce_key` is set), and every older
        `mapped`/`held` job of that key -> `superseded` (`superseded_by` = this job, with the
        rows `announce(superseded_job)` returns). When a newer waiting job of the key exists,
        this job is superseded by it instead. Jobs superseded earlier by a job that is now
        superseded point at its replacement too: `superseded_by` always names the job that
        renders, never another superseded one. Returns this job.
        """

    async def spend_counts(self, since: float) -> dict[str, int]:
        """Spend records with `at >= since`, counted per route (for release, CLI, metrics)."""

    async def save_render_estimate(self, key: str, seconds: float) -> None:
        """Keep the learned render time of `key` (a template) across restarts."""

    async def render_estimates(self) -> dict[str, float]:
        """Every learned render time by key."""

    async def renew_leases(self, owner: str, lease_s: float) -> int:
        """Extend every lease `owner` holds to now + `lease_s`; how many were extended."""

    async def count_jobs_by_state(self) -> dict[JobState, int]:
        """For metrics and readiness."""

    async def due_outbox(self, now: float, limit: int = 100) -> list[OutboxMessage]:
        """Pending outbox rows whose next attempt is due.

        On a store several instances share, the rows returned are claimed for this instance
        until `now` + its lease: the others do not send them meanwhile.
        """

    async def renew_outbox_claims(self, message_ids: Collection[int], now: float) -> None:
        """Extend this instance's claim on rows it is still sending to `now` + its lease.

        A delivery may outlast the lease (a slow target, a large download): without renewal
        another instance would take the row and announce it a second time. Rows finished,
        released by a retry or claimed by another instance are left alone; where one process
        owns the store there are no claims, and this does nothing.
        """

    async def outbox_delivered(self, message_id: int) -> None:
        """Mark one outbox row delivered."""

    async def outbox_retry(self, message_id: int, next_attempt_at: float, error: str) -> None:
        """Record a failed attempt and when to try again."""

    async def outbox_dead(self, message_id: int, error: str) -> None:
        """Give up on one outbox row (410 Gone, retries exhausted), keeping it for inspection."""

    async def outbox_pending_for_job(self, job_id: str) -> int:
        """How many outbox rows of this job are still pending."""

    async def ready_jobs_delivered(self, limit: int) -> list[Job]:
        """`ready` jobs with no pending outbox row, oldest first: one query for the settle scan.

        A crash between a job's last delivery and its `notified` commit leaves such a job.
        """

    async def outbox_backlog(self) -> int:
        """How many outbox rows are pending, for metrics."""

    async def purge_dedupe(self, older_than: float) -> int:
        """Forget dedupe keys of events received before `older_than` (kept >= 7 days)."""

    async def ping(self) -> None:
        """Prove the store is writable; raise StoreUnavailableError otherwise."""

    def exclusive_lock(self, name: str, *, lapse_s: float) -> ExclusiveLock:
        """The lock called `name`, shared by every process on this store.

        A holder that goes silent (its process frozen, its machine gone) loses the lock after
        about `lapse_s`; on a store one process owns, the lock is simply always held.
        """

    # --- operator console reads (read-only; nothing here is on a path that moves money) ---

    async def count_events_by_status(self) -> dict[EventStatus, int]:
        """Inbox rows by status, zeros included: the dead letters waiting are `rejected`."""

    async def jobs_of_event(self, event_row: int) -> list[Job]:
        """The jobs one inbox row became."""

    async def job_announcements(self, job_id: str) -> list[Announcement]:
        """Every outbox row of one job (all rounds and targets) with its delivery record."""

    async def count_outbox_by_status(self) -> dict[str, int]:
        """Outbox rows by status: `pending`, `delivered`, `dead`."""

    async def activity_per_minute(self, since: float) -> list[MinuteActivity]:
        """Events received and videos made ready per minute since `since` (empty minutes out)."""

    async def exports_by_route(self, since: float) -> dict[str, int]:
        """Paid exports accepted by the API since `since`, per route."""

    async def count_jobs_by_route(self) -> dict[str, dict[JobState, int]]:
        """Jobs per route and state."""
