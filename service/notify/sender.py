"""The outbox sender: every committed "video ready" reaches every target, at least once.

Rows were written in the same transaction as the job's terminal state, so nothing is lost if
the process dies; this loop only has to keep trying. A crash between sending and marking a
row delivered sends it again (same payload, same webhook id): consumers dedupe on `job_id`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import anyio

from service.log import get_logger
from service.store.base import StaleTransitionError, StoreUnavailableError

if TYPE_CHECKING:
    import random
    from collections.abc import Mapping

    from anyio.abc import TaskGroup, TaskStatus

    from service.model import OutboxMessage
    from service.store.base import Store

log = get_logger("notify.sender")

RETRY_SCHEDULE_S = (5.0, 30.0, 120.0, 600.0, 3600.0, 3 * 3600.0, 6 * 3600.0)
"""Delay before attempt n+1 after n failures; the last value repeats (about 1.5 days at 12)."""

JITTER = 0.2
"""Retries spread +-20% so targets that came back are not hit by every row in one instant."""

DEFAULT_MAX_ATTEMPTS = 12
_SETTLE_SCAN_LIMIT = 100_000
STORE_RETRY_S = 5.0


class DeliveryError(Exception):
    """A target did not take the message.

    `permanent`: never retry (410 Gone). `retry_after_s`: the target said when to come back.
    `attempt_limit`: a lower cap than the sender's for errors unlikely to heal by themselves
    (an unexpected 4xx), so they die after a few tries instead of a day and a half.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        permanent: bool = False,
        attempt_limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.permanent = permanent
        self.attempt_limit = attempt_limit


class Notifier(Protocol):
    """One notify target: deliver one message or raise DeliveryError."""

    async def deliver(self, message: OutboxMessage) -> None:
        """Return only once the target has acknowledged the message."""


Clock = Callable[[], float]
"""Wall-clock epoch seconds (`time.time`): outbox due times survive restarts."""


def retry_delay_s(failures: int, unit_random: float) -> float:
    """Delay after `failures` failed attempts (>= 1), jittered by `unit_random` in [0, 1)."""
    base = RETRY_SCHEDULE_S[min(failures, len(RETRY_SCHEDULE_S)) - 1]
    return base * (1.0 - JITTER + 2 * JITTER * unit_random)


class OutboxSender:
    """One loop for all targets, with bounded concurrency and no row in flight twice.

    `claim_renew_s` (a third of the store's outbox claim, as job leases are renewed) is how
    often the claims of the rows in flight are renewed; None leaves them to the scans.
    `settle_every_s` is how often `ready` jobs with nothing left to deliver are looked for
    again after the scan at start: on a store several instances share, one that died between
    its last delivery and the job's `notified` commit leaves such a job behind while the
    others keep running, and no start of theirs would come to look. None: only at start (one
    process owns the store, so the start after its crash is the one that looks).
    """

    def __init__(
        self,
        store: Store,
        targets: Mapping[str, Notifier],
        *,
        clock: Clock,
        rng: random.Random,
        on_job_delivered: Callable[[str], Awaitable[None]],
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_concurrency: int = 16,
        idle_poll_s: float = 30.0,
        claim_renew_s: float | None = None,
        settle_every_s: float | None = None,
    ) -> None:
        self._store = store
        self._targets = dict(targets)
        self._clock = clock
        self._rng = rng
        self._on_job_delivered = on_job_delivered
        self._max_attempts = max_attempts
        self._max_concurrency = max_concurrency
        self._idle_poll_s = idle_poll_s
        self._claim_renew_s = claim_renew_s
        self._settle_every_s = settle_every_s
        self._draining = False
        self._delivery_ended = anyio.Event()
        self._in_flight: set[int] = set()
        self._ended_during_scan: set[int] | None = None
        self._wake = anyio.Event()
        self._retry_dues: list[float] = []
        self._settle_lock = anyio.Lock()
        self._unsettled: set[str] = set()
        self._finished_during_settle_scan: set[str] | None = None

    def wake(self) -> None:
        """Look for due rows now: new rows were committed, or a test moved its clock."""
        self._wake.set()

    async def drain(self) -> None:
        """Start no new delivery, and return once those under way are settled (graceful stop).

        A delivery cut off by the shutdown may already have reached its target without being
        marked, and would be sent again after the restart: the shutdown lets it finish instead.
        """
        self._draining = True
        self.wake()
        if self._in_flight:
            log.info("outbox_draining", in_flight=len(self._in_flight))
        while self._in_flight:
            self._delivery_ended = anyio.Event()
            await self._delivery_ended.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver due rows until cancelled; started means the first scan is under way.

        Jobs a crash left `ready` are settled beside the deliveries, not before them: that
        is one store round trip per `ready` job, and the service is not ready until this
        loop has started.
        """
        async with anyio.create_task_group() as tg:
            if self._claim_renew_s is not None:
                tg.start_soon(self._renew_claims, self._claim_renew_s, name="outbox-claims")
            self._finished_during_settle_scan = set()  # before any delivery can finish a job
            tg.start_soon(self._settle_now_and_every, self._settle_every_s, name="outbox-settle")
            task_status.started()
            while True:
                self._wake = anyio.Event()
                await self._retry_unsettled()
                wait_s = await self._start_due(tg)
                with anyio.move_on_after(wait_s):
                    await self._wake.wait()

    async def _renew_claims(self, every_s: float) -> None:
        """Keep the claims of the rows being sent while their deliveries last.

        A scan claims what it returns for one lease, but nothing scans while the sender waits
        on a slow target; a lapsed claim would let another instance send the row as well.
        """
        while True:
            await anyio.sleep(every_s)
            if not self._in_flight:
                continue
            try:
                await self._store.renew_outbox_claims(set(self._in_flight), self._clock())
            except StoreUnavailableError as exc:
                log.warning("outbox_claim_renew_failed", error=str(exc))

    async def _settle_now_and_every(self, every_s: float | None) -> None:
        """The settle scan at start, then again every `every_s` (never, when None)."""
        await self._settle_finished_jobs()
        if every_s is None:
            return
        while True:
            await anyio.sleep(every_s)
            async with self._settle_lock:
                # Under the lock: a delivery finishing a job now is either done already (the
                # job is no longer `ready` when the scan reads it) or recorded in the set.
                self._finished_during_settle_scan = set()
            await self._settle_finished_jobs()

    async def _settle_finished_jobs(self) -> None:
        """Finish `ready` jobs that have nothing left to deliver.

        A crash between the last row's `delivered` commit and the job's `notified` commit
        leaves such a job behind; nothing else would ever look at it again. The scan runs
        beside the deliveries; a job a delivery finished meanwhile is skipped, so the two
        never both finish it. A store failure is retried until the scan completes.
        """
        finished = self._finished_during_settle_scan
        if finished is None:
            return
        try:
            while True:
                try:
                    await self._settle_ready_jobs(finished)
                except StoreUnavailableError as exc:
                    log.warning("outbox_settle_scan_failed", error=str(exc))
                    await anyio.sleep(STORE_RETRY_S)
                else:
                    return
        finally:
            self._finished_during_settle_scan = None

    async def _settle_ready_jobs(self, finished: set[str]) -> None:
        """One pass of the scan; `finished` are the jobs deliveries finished meanwhile."""
        for job in await self._store.ready_jobs_delivered(_SETTLE_SCAN_LIMIT):
            # A delivery that finished the job's last row counted and finished it under the
            # lock, before the query above could see nothing pending: it is in `finished`.
            async with self._settle_lock:
                if job.job_id not in finished:
                    await self._on_job_delivered(job.job_id)
                    finished.add(job.job_id)

    async def _start_due(self, tg: TaskGroup) -> float:
        """Start deliveries for due rows; return how long to wait before looking again."""
        free = self._max_concurrency - len(self._in_flight)
        if self._draining:
            return math.inf  # rows not started yet wait for the next start
        if free <= 0:
            return math.inf  # a finishing delivery wakes the loop
        now = self._clock()
        # A delivery that ends while the scan reads may be in the scan's older snapshot as
        # still pending: remember what ended meanwhile so it is not sent a second time.
        self._ended_during_scan = set()
        try:
            rows = await self._store.due_outbox(now, limit=free + len(self._in_flight))
        except StoreUnavailableError as exc:
            log.warning("outbox_scan_failed", error=str(exc))
            return STORE_RETRY_S
        finally:
            ended, self._ended_during_scan = self._ended_during_scan, None
        busy = self._in_flight | ended
        for row in [r for r in rows if r.id not in busy][:free]:
            self._in_flight.add(row.id)
            tg.start_soon(self._deliver, row, name=f"outbox-{row.id}")
        while self._retry_dues and self._retry_dues[0] <= now:
            heapq.heappop(self._retry_dues)
        next_due = self._retry_dues[0] if self._retry_dues else math.inf
        return max(0.0, min(self._idle_poll_s, next_due - now))

    async def _deliver(self, row: OutboxMessage) -> None:
        try:
            await self._attempt(row)
        except StoreUnavailableError as exc:
            # The row stays pending in the store; the next scan picks it up again.
            log.warning("outbox_mark_failed", message_id=row.id, job_id=row.job_id, error=str(exc))
            self._remember_due(self._clock() + STORE_RETRY_S)
        finally:
            self._in_flight.discard(row.id)
            if self._ended_during_scan is not None:
                self._ended_during_scan.add(row.id)
            self._delivery_ended.set()
            self.wake()

    async def _attempt(self, row: OutboxMessage) -> None:
        target = self._targets.get(row.target)
        if target is None:
            await self._dead(row, f"no notify target named {row.target!r} is configured")
            return
        try:
            await target.deliver(row)
        except DeliveryError as exc:
            await self._failed(row, exc)
            return
        except Exception as exc:  # one broken delivery must not stop the others
            log.exception("outbox_delivery_crashed", message_id=row.id, job_id=row.job_id)
            await self._failed(row, DeliveryError(f"unexpected error: {exc!r}"))
            return
        log.info(
            "outbox_delivered",
            message_id=row.id,
            job_id=row.job_id,
            target=row.target,
            event_type=row.event_type,
            attempt=row.attempts + 1,
        )
        await self._settle(row, dead_reason=None)

    async def _failed(self, row: OutboxMessage, exc: DeliveryError) -> None:
        failures = row.attempts + 1
        limit = min(self._max_attempts, exc.attempt_limit or self._max_attempts)
        if exc.permanent:
            await self._dead(row, str(exc))
            return
        if failures >= limit:
            await self._dead(row, f"gave up after {failures} attempts: {exc}")
            return
        if exc.retry_after_s is not None:
            delay_s = max(0.0, exc.retry_after_s)
        else:
            delay_s = retry_delay_s(failures, self._rng.random())
        due = self._clock() + delay_s
        log.warning(
            "outbox_retry",
            message_id=row.id,
            job_id=row.job_id,
            target=row.target,
            attempt=failures,
            retry_in_s=round(delay_s, 1),
            error=str(exc),
        )
        await self._store.outbox_retry(row.id, due, str(exc))
        self._remember_due(due)

    async def _dead(self, row: OutboxMessage, reason: str) -> None:
        log.error(
            "outbox_dead",
            message_id=row.id,
            job_id=row.job_id,
            target=row.target,
            event_type=row.event_type,
            reason=reason,
        )
        await self._settle(row, dead_reason=reason)

    async def _settle(self, row: OutboxMessage, *, dead_reason: str | None) -> None:
        """Mark a row finished; tell the pipeline once when it was the job's last pending row.

        Marking and counting happen under one lock, so two rows of the same job finishing
        together cannot both see zero. A dead row also finishes its job's notifying: it is
        kept for inspection, and nothing further will happen to it.
        """
        async with self._settle_lock:
            if dead_reason is None:
                await self._store.outbox_delivered(row.id)
            else:
                await self._store.outbox_dead(row.id, dead_reason)
            # The row is finished and no scan will see it again: from here on a store
            # failure is retried through `_unsettled`, or the job would stay `ready`.
            self._unsettled.add(row.job_id)
            settled = await self._finish_job_if_done(row.job_id)
        if not settled:
            self._remember_due(self._clock() + STORE_RETRY_S)

    async def _retry_unsettled(self) -> None:
        """Finish the jobs whose last step failed; stop at the first store failure.

        Only jobs that failed are looked at, so a healthy loop does no extra store work, and a
        store that is still down costs one call per loop turn.
        """
        for job_id in list(self._unsettled):
            async with self._settle_lock:
                settled = job_id not in self._unsettled or await self._finish_job_if_done(job_id)
            if not settled:
                self._remember_due(self._clock() + STORE_RETRY_S)
                return

    async def _finish_job_if_done(self, job_id: str) -> bool:
        """Tell the pipeline when `job_id` has no pending row; False if the store failed.

        Callers hold the settle lock, so a sibling row's mark cannot slip between the count
        and the pipeline call.
        """
        try:
            pending = await self._store.outbox_pending_for_job(job_id)
            if not pending:
                await self._on_job_delivered(job_id)
                if self._finished_during_settle_scan is not None:
                    self._finished_during_settle_scan.add(job_id)
        except StaleTransitionError:
            log.info("job_already_moved", job_id=job_id)
        except StoreUnavailableError as exc:
            log.warning("job_settle_failed", job_id=job_id, error=str(exc))
            return False
        self._unsettled.discard(job_id)
        return True

    def _remember_due(self, due: float) -> None:
        """Wake for retries this process scheduled; other writers are found by the idle poll."""
        heapq.heappush(self._retry_dues, due)
