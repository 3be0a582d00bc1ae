"""The render pipeline: preparer, submitter, reconciler and tracker as one supervised unit.

`run` recovers every non-terminal job before starting the loops (so a crash between any two
commits resumes where it stopped, and a POST that may have happened is reconciled, never
repeated), then starts each loop as a named child of one task group. A failing job is its
own problem; a failing loop fails the group, visibly. A store outage is neither: a loop whose
queue read fails logs it and reads again after `SCAN_RETRY_S`.
"""

from __future__ import annotations

import hmac
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
import structlog

from service.jobs.budget import (
    BudgetLimits,
    Spent,
    caps_for,
    day_start,
    month_start,
    next_rollover,
    releasable,
)
from service.jobs.context import JobLoopContext, end_with_error
from service.jobs.decide import Step, resume_step
from service.jobs.ownership import LEASE_S, OwnedJobs
from service.jobs.ports import RenderApi
from service.jobs.ratelimit import RenderSlots
from service.jobs.reconcile import Reconciler
from service.jobs.states import IN_FLIGHT
from service.jobs.submitter import SCAN_RETRY_S, RenderCache, Submitter, sleep_or_wake
from service.jobs.tracker import (
    PollTiming,
    ReadyHook,
    Tracker,
    ignore_ready,
    route_of,
)
from service.log import get_logger
from service.model import Job, JobState, JobUpdate, SpendCap
from service.store.base import StaleTransitionError, StoreUnavailableError

if TYPE_CHECKING:
    from service.backoff import RandomSource
    from service.config import AIStudiosConfig
    from service.jobs.context import OutboxFor
    from service.jobs.ratelimit import RequestGate
    from service.jobs.schedule import Clock, Sleep
    from service.store.base import Store

log = get_logger("jobs.pipeline")

__all__ = ["BatchPrepare", "JobPipeline", "Prepare", "RenderApi"]

Prepare = Callable[[Job], Awaitable[None]]
"""The caller's `received -> mapped|rejected` step (template + event -> export body)."""


@runtime_checkable
class BatchPrepare(Protocol):
    """A mapper that maps a whole batch in one store transaction (the daemon's `Preparer`)."""

    async def prepare_many(self, jobs: Sequence[Job]) -> None:
        """Commit `mapped` or `rejected` for each job; StoreUnavailableError defers them all."""
        ...


_RECOVERY_LIMIT = 100_000
_PREPARE_BATCH = 100
"""Jobs mapped side by side by a one-job mapper."""
_PREPARE_MANY = 100
"""Jobs per batch of a batch mapper: one read and one commit per hundred jobs keeps up with a
flood, and a burst's first jobs reach the submitter while the rest are still being mapped."""
_DUMMY_TOKEN = "x" * 32
BUDGET_RESCAN_S = 60.0
"""How often held jobs are looked at between rollovers (room freed by a refunded call)."""
PREPARE_RETRY_S = 1.0
"""How soon mapping is tried again after a store outage deferred a job."""


class JobPipeline:
    """Owns the job loops and the render budget they share."""

    def __init__(
        self,
        *,
        store: Store,
        api: RenderApi,
        gate: RequestGate,
        settings: AIStudiosConfig,
        prepare: Prepare | BatchPrepare,
        outbox_for: OutboxFor,
        public_url: str | None = None,
        on_ready: ReadyHook = ignore_ready,
        clock: Clock = time.time,
        sleep: Sleep = anyio.sleep,
        rng: RandomSource | None = None,
        owner_id: str | None = None,
        lease_s: float = LEASE_S,
        estimate_key: Callable[[Job], str] = route_of,
        budget: BudgetLimits | None = None,
        budget_rescan_s: float = BUDGET_RESCAN_S,
        cache: RenderCache | None = None,
    ) -> None:
        self._prepare_many = prepare if isinstance(prepare, BatchPrepare) else None
        self._prepare = prepare if callable(prepare) else _one_by_one(prepare)
        self.budget = budget or BudgetLimits()
        self._budget_rescan_s = budget_rescan_s
        self._budget_wakeup = anyio.Event()
        self.slots = RenderSlots(settings.max_concurrent_exports)
        self.owned = OwnedJobs(
            store, self.slots, owner=owner_id or socket.gethostname(), lease_s=lease_s
        )
        self._ctx = ctx = JobLoopContext[RenderApi](
            store=self.owned,
            api=api,
            slots=self.slots,
            gate=gate,
            outbox_for=outbox_for,
            clock=clock,
            sleep=sleep,
            rng=rng or random.SystemRandom(),
        )
        self.tracker = Tracker(
            ctx,
            timing=PollTiming(
                floor_s=settings.poll_min_interval_s,
                ceiling_s=settings.poll_max_interval_s,
                deadline_s=settings.render_deadline_seconds,
                stall_s=settings.stall_seconds,
                first_guess_s=settings.first_poll_s,
            ),
            on_ready=on_ready,
            estimate_key=estimate_key,
        )
        self.submitter = Submitter(
            ctx,
            max_retries=settings.max_retries,
            public_url=public_url,
            on_submitted=self.tracker.track,
            on_reconcile=self._reconcile,
            claim=self._claim_mapped,
            may_pay=self.owned.may_pay,
            claim_wait_s=lease_s,
            caps=self._caps_for,
            on_held=self._on_held,
            cache=cache,
        )
        self.reconciler = Reconciler(
            ctx,
            wait_s=settings.reconcile_wait_s,
            look_every_s=settings.poll_max_interval_s,
            settle_s=settings.export_settle_s,
            on_adopted=self.tracker.track,
            on_resubmit=self.submitter.wake,
        )
        self._prepare_wakeup = anyio.Event()
        self._prepare_skip: set[str] = set()
        """Jobs prepare() already had this round; an intake or operator wake-up clears it."""

    def _reconcile(self, job: Job) -> None:
        self.reconciler.add(job)

    def _caps_for(self, job: Job) -> tuple[SpendCap, ...]:
        return caps_for(self.budget, job.route, self._ctx.clock())

    def _on_held(self, _job: Job) -> None:
        # A refund (an export that created nothing) may have made room since the last scan.
        self._budget_wakeup.set()

    def set_budget(self, budget: BudgetLimits) -> None:
        """New caps (a reloaded config): held jobs the new room admits are released now."""
        self.budget = budget
        self._budget_wakeup.set()

    def release_held(self) -> None:
        """Look at the held jobs now (an operator's `studiohook budget release`)."""
        self._budget_wakeup.set()

    async def spent(self) -> Spent:
        """Billed exports recorded in the current day and month (all routes, and per route)."""
        now = self._ctx.clock()
        today = await self._ctx.store.spend_counts(day_start(now))
        this_month = await self._ctx.store.spend_counts(month_start(now))
        return Spent(day=sum(today.values()), month=sum(this_month.values()), route_day=today)

    async def _budget_loop(self) -> None:
        """Forever: release the held jobs the caps admit, at each rollover and when woken.

        Between rollovers it also looks every `budget_rescan_s`, since a refunded call (one
        that certainly created nothing) frees room without any other signal.
        """
        while True:
            self._budget_wakeup = anyio.Event()
            released = False
            try:
                await self._release_admitted()
                released = True
            except StoreUnavailableError as exc:
                log.warning("budget.release_failed", error=str(exc))
            if released and not self.budget.enabled:
                # No cap, so nothing new is ever held: only new caps (a reload) or an
                # operator's release wake it, and no timer runs on the loops' clock.
                await self._budget_wakeup.wait()
                continue
            now = self._ctx.clock()
            wait_s = min(next_rollover(now) - now, self._budget_rescan_s)
            await sleep_or_wake(self._budget_wakeup, wait_s, self._ctx.sleep)

    async def _release_admitted(self) -> None:
        held = await self._ctx.store.jobs_in_states({JobState.HELD}, limit=_RECOVERY_LIMIT)
        if not held:
            return
        admitted = releasable(held, self.budget, await self.spent())
        released = 0
        for job_id in admitted:
            try:
                await self._ctx.store.transition(
                    job_id,
                    {JobState.HELD},
                    JobState.MAPPED,
                    JobUpdate(
                        clear=frozenset({"error_code", "error_message", "next_attempt_at"}),
                        note="released: the spending caps have room",
                    ),
                )
            except StaleTransitionError:
                continue  # another worker released it first
            released += 1
        if released:
            log.info("budget.released", count=released, still_held=len(held) - released)
        if admitted:
            # Also when another worker released them first: this one may hold their claims.
            self.submitter.wake()

    async def _claim_mapped(self, job_id: str) -> Job | None:
        return await self.owned.claim(job_id, {JobState.MAPPED})

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Recover, start the loops, report started; returns only by cancellation or a bug."""
        await self.tracker.load_estimates()
        await self.recover()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._prepare_loop, name="jobs.preparer")
            tg.start_soon(self.submitter.run, name="jobs.submitter")
            tg.start_soon(self.reconciler.run, name="jobs.reconciler")
            tg.start_soon(self.tracker.run, name="jobs.tracker")
            tg.start_soon(self._lease_loop, name="jobs.leases")
            tg.start_soon(self._budget_loop, name="jobs.budget")
            task_status.started()

    async def recover(self) -> None:
        """Claim the in-flight jobs nobody holds and resume each where it stopped.

        That is this owner's own after a restart, and any whose lease ran out; jobs another
        live worker holds are left to it.
        """
        in_flight = await self.owned.claim_free(IN_FLIGHT, _RECOVERY_LIMIT, take_own=True)
        await self._resume(in_flight)
        log.info("jobs.recovered", in_flight=len(in_flight))

    async def _resume(self, jobs: list[Job]) -> None:
        for job in jobs:
            with structlog.contextvars.bound_contextvars(job_id=job.job_id):
                await self._recover_one(job)

    async def _lease_loop(self) -> None:
        """Forever: renew this worker's leases, and take over jobs whose worker stopped renewing.

        A store outage only skips a beat: a lease is three beats long.
        """
        while True:
            # Leases run on the store's wall clock, not on the loops' (possibly simulated) one.
            await anyio.sleep(self.owned.lease_s / 3)
            try:
                await self.owned.renew()
                taken = await self.owned.claim_free(IN_FLIGHT, _RECOVERY_LIMIT, take_own=False)
            except StoreUnavailableError as exc:
                log.warning("jobs.lease_renewal_failed", error=str(exc))
                continue
            if taken:
                log.warning("jobs.taken_over", count=len(taken))
                await self._resume(taken)

    async def _recover_one(self, job: Job) -> None:
        step = resume_step(job.state, job.api, job.project_id)
        if step is Step.TRACK:
            self.tracker.track(job)
            return
        if step is not Step.LOOK_UP:
            return
        if job.state is JobState.SUBMITTING:
            note = "restart found the export's outcome unknown"
            try:
                job = await self._ctx.store.transition(
                    job.job_id,
                    {JobState.SUBMITTING},
                    JobState.RECONCILE,
                    JobUpdate(error_code="ambiguous", error_message=note, note=note),
                )
            except StaleTransitionError:
                return
            log.warning("job.reconcile", reason=note)
        self.reconciler.add(job)

    async def drain(self) -> None:
        """Let exports under way finish and commit; start no new one (graceful shutdown)."""
        await self.submitter.drain()

    def notify_new_jobs(self) -> None:
        """The intake (or an operator's retry) committed jobs: map and submit them."""
        self._prepare_skip.clear()
        self._prepare_wakeup.set()
        self.submitter.wake()

    async def on_callback(self, job_id: str, token: str) -> bool:
        """A completion callback: True when its token is the job's; it only brings a poll forward.

        The token is compared in constant time, and an unknown job costs the same comparison,
        so neither job ids nor tokens can be probed through timing.
        """
        job = await self._ctx.store.get_job(job_id)
        expected = job.callback_token if job is not None and job.callback_token else None
        matches = hmac.compare_digest((expected or _DUMMY_TOKEN).encode(), token.encode())
        if expected is None or not matches:
            log.warning("callback.refused", job_id=job_id)
            return False
        await self.tracker.wake(job_id)
        return True

    async def _prepare_loop(self) -> None:
        """Map received jobs a batch at a time, then hand them on.

        A batch mapper maps up to `_PREPARE_MANY` jobs per store transaction; a one-job mapper
        runs a batch's jobs side by side, so their `mapped` commits reach the store's
        group-commit writer together (one commit per job made mapping far slower than
        intake). A batch that met a store outage is not skipped: the loop looks again after
        `PREPARE_RETRY_S` instead of waiting for an intake wake-up that may never come.
        """
        limit = _PREPARE_MANY if self._prepare_many is not None else _PREPARE_BATCH
        while True:
            self._prepare_wakeup = anyio.Event()
            try:
                jobs = await self._ctx.store.jobs_in_states({JobState.RECEIVED}, limit=limit)
            except StoreUnavailableError as exc:
                log.warning("jobs.scan_failed", state=JobState.RECEIVED, error=str(exc))
                await sleep_or_wake(self._prepare_wakeup, SCAN_RETRY_S, self._ctx.sleep)
                continue
            fresh = [job for job in jobs if job.job_id not in self._prepare_skip]
            if self._prepare_many is not None:
                deferred = await self._prepare_many_isolated(self._prepare_many, fresh)
            else:
                deferred = await self._prepare_batch(fresh)
            if fresh:
                self.submitter.wake()
            if deferred:
                await sleep_or_wake(self._prepare_wakeup, PREPARE_RETRY_S, self._ctx.sleep)
            elif len(jobs) < limit or not fresh:
                await self._prepare_wakeup.wait()

    async def _prepare_many_isolated(self, prepare: BatchPrepare, jobs: list[Job]) -> bool:
        """Map `jobs` in one go; True when a store outage deferred them."""
        if not jobs:
            return False
        self._prepare_skip.update(job.job_id for job in jobs)
        try:
            await prepare.prepare_many(jobs)
        except StoreUnavailableError as exc:
            log.warning("jobs.prepare_deferred", count=len(jobs), error=str(exc))
            self._prepare_skip.difference_update(job.job_id for job in jobs)
            return True
        except Exception:
            # A bug outside any one job's mapping: map them one by one, each isolated.
            log.exception("jobs.prepare_batch_crashed", count=len(jobs))
            return await self._prepare_batch(jobs)
        return False

    async def _prepare_batch(self, jobs: list[Job]) -> bool:
        """Map `jobs` side by side; True when a store outage deferred any of them."""
        deferred: list[str] = []

        async def one(job: Job) -> None:
            with structlog.contextvars.bound_contextvars(job_id=job.job_id):
                if not await self._prepare_isolated(job):
                    self._prepare_skip.discard(job.job_id)
                    deferred.append(job.job_id)

        self._prepare_skip.update(job.job_id for job in jobs)
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(one, job, name=f"prepare {job.job_id}")
        return bool(deferred)

    async def _prepare_isolated(self, job: Job) -> bool:
        """Run the caller's mapping; a crash in it rejects the job with the reason.

        False when a store outage left the job `received`, to be tried again.
        """
        try:
            await self._prepare(job)
        except StoreUnavailableError as exc:
            log.warning("job.prepare_deferred", error=str(exc))
            return False
        except Exception as exc:
            log.exception("job.prepare_crashed")
            return await self._reject(job, f"mapping crashed: {exc!r}")
        return True

    async def _reject(self, job: Job, reason: str) -> bool:
        try:
            await end_with_error(
                self._ctx.store,
                self._ctx.outbox_for,
                job,
                {JobState.RECEIVED},
                JobState.REJECTED,
                code="prepare_error",
                message=reason,
                now=self._ctx.clock(),
            )
        except StoreUnavailableError as exc:
            log.warning("job.reject_deferred", error=repr(exc))
            return False
        return True


def _one_by_one(prepare: BatchPrepare) -> Prepare:
    """The one-job form of a batch mapper (for callers that hold only the batch form)."""

    async def one(job: Job) -> None:
        await prepare.prepare_many([job])

    return one
