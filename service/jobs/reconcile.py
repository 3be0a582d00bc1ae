"""`reconcile`: a paid call whose outcome is unknown is settled by looking, never by posting blind.

Two-step v3 jobs read the very project they exported (`GET …/editor/project/{id}`): within
seconds it shows whether the export started. One-step v3 jobs look their export up by name in
the project list, repeated every `look_every_s` and, since that list may show only finished
exports, concluded "never created" only after `reconcile_wait_s`. What each answer means is
decided in `decide.py`. Legacy exports carry no name and no readable project, so an uncertain
legacy create fails instead of risking a second payment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from service.backoff import backoff_delay
from service.jobs.context import DueHeap
from service.jobs.decide import (
    Adopt,
    ExportAgain,
    LookupDecision,
    ProjectLook,
    after_name_lookup,
    after_project_read,
)
from service.jobs.ports import ApiError, LookupApi, NothingCreatedError, RefusedError
from service.jobs.schedule import retry_delay
from service.jobs.submitter import sleep_or_wake
from service.log import get_logger
from service.model import API_LEGACY, API_V3, Job, JobState, JobUpdate
from service.store.base import StaleTransitionError, StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable

    from service.jobs.context import JobLoopContext

log = get_logger("jobs.reconcile")

LOOKUP_RETRY_BASE_S = 2.0
LOOKUP_RETRY_CAP_S = 300.0
LEGACY_UNKNOWN = "legacy export outcome unknown; not retried to avoid paying twice"
_HTTP_NOT_FOUND = 404


__all__ = ["LEGACY_UNKNOWN", "LookupApi", "Reconciler"]


@dataclass(slots=True)
class _Pending:
    """One job being reconciled: when it entered `reconcile` and how lookups went."""

    job_id: str
    entered_at: float
    seq: int = 0
    errors: int = 0


class Reconciler:
    """One loop for all uncertain creates: adopt what exists, re-queue what surely does not."""

    def __init__(
        self,
        ctx: JobLoopContext[LookupApi],
        *,
        wait_s: float,
        look_every_s: float,
        settle_s: float,
        on_adopted: Callable[[Job], None],
        on_resubmit: Callable[[], None],
    ) -> None:
        self._ctx = ctx
        self._wait_s = wait_s
        self._look_every_s = look_every_s
        self._settle_s = settle_s
        self._on_adopted = on_adopted
        self._on_resubmit = on_resubmit
        self._pending: dict[str, _Pending] = {}
        self._due = DueHeap()
        self._wakeup = anyio.Event()

    def add(self, job: Job) -> None:
        """Reconcile a job now in `reconcile` (its `updated_at` is when it entered).

        A job still in `submitting` is one whose POST outcome the submitter could not commit
        (the store was down): the first check moves it to `reconcile`, as a restart would.
        """
        pending = _Pending(job.job_id, entered_at=job.updated_at)
        self._pending[job.job_id] = pending
        self._schedule(pending, self._ctx.clock())

    def _schedule(self, pending: _Pending, due_at: float) -> None:
        pending.seq = self._due.push(pending.job_id, due_at)
        self._wakeup.set()

    async def run(self) -> None:
        """Forever: look up each due job in turn, then sleep until the next is due."""
        while True:
            self._wakeup = anyio.Event()
            now = self._ctx.clock()
            while (entry := self._due.pop_due(now)) is not None:
                seq, job_id = entry
                pending = self._pending.get(job_id)
                if pending is not None and pending.seq == seq:
                    with structlog.contextvars.bound_contextvars(job_id=job_id):
                        await self._check_isolated(pending)
                now = self._ctx.clock()
            await sleep_or_wake(self._wakeup, self._due.next_due() - now, self._ctx.sleep)

    async def _check_isolated(self, pending: _Pending) -> None:
        """One lookup; a store outage or a bug is this job's problem, retried later."""
        try:
            await self.check(pending)
        except StoreUnavailableError as exc:
            log.warning("job.reconcile_deferred", error=str(exc))
            self._retry_later(pending, exc)
        except Exception:
            # A bug must not lose the job nor pay twice: keep it in `reconcile` and retry.
            log.exception("job.reconcile_crashed")
            self._retry_later(pending, None)

    def _retry_later(self, pending: _Pending, exc: BaseException | None) -> None:
        pending.errors += 1
        base_s, cap_s = LOOKUP_RETRY_BASE_S, LOOKUP_RETRY_CAP_S
        if exc is None:
            delay = backoff_delay(pending.errors, base_s=base_s, cap_s=cap_s, rng=self._ctx.rng)
        else:
            delay = retry_delay(exc, pending.errors, base_s=base_s, cap_s=cap_s, rng=self._ctx.rng)
        self._schedule(pending, self._ctx.clock() + delay)

    async def check(self, pending: _Pending) -> None:
        """Look the export up once and act on the answer."""
        job = await self._ctx.store.get_job(pending.job_id)
        if job is not None and job.state is JobState.SUBMITTING:
            job = await self._take_over(job, pending)
        if job is None or job.state is not JobState.RECONCILE:
            self._forget(pending.job_id, job)
            return
        if job.api == API_LEGACY:
            await self._fail(job, LEGACY_UNKNOWN)
            return
        try:
            decision = await self._look_up(job, pending)
        except ApiError as exc:
            # Not knowing is no reason to post again: keep looking with back-off.
            if isinstance(exc, NothingCreatedError):
                self._ctx.gate.throttled(exc)
            log.warning("job.reconcile_lookup_failed", error=exc.message)
            self._retry_later(pending, exc)
            return
        if isinstance(decision, Adopt):
            await self._adopt(job, pending, decision.project_id)
        elif isinstance(decision, ExportAgain):
            await self._resubmit(job, decision)
        else:
            log.info("job.reconcile_waiting", next_look_s=round(decision.at - self._ctx.clock(), 3))
            self._schedule(pending, decision.at)

    async def _look_up(self, job: Job, pending: _Pending) -> LookupDecision:
        """Read what the API shows of this job's export and decide (see `decide.py`)."""
        if job.api == API_V3 and job.project_id is not None:
            try:
                project = await self._ctx.api.get_project_v3(job.project_id)
            except RefusedError as exc:
                if exc.status != _HTTP_NOT_FOUND:
                    raise
                look = ProjectLook(exists=False, export_started=False)
            else:
                look = ProjectLook(exists=True, export_started=project.export_started)
            return after_project_read(
                look,
                job.project_id,
                entered_at=pending.entered_at,
                now=self._ctx.clock(),
                settle_s=self._settle_s,
            )
        found = await self._ctx.api.find_project_by_name(job.export_name)
        return after_name_lookup(
            found.id if found is not None else None,
            job.export_name,
            entered_at=pending.entered_at,
            now=self._ctx.clock(),
            wait_s=self._wait_s,
            look_every_s=self._look_every_s,
        )

    async def _take_over(self, job: Job, pending: _Pending) -> Job | None:
        """`submitting -> reconcile` for a job handed over with its export outcome uncommitted."""
        note = "export outcome could not be committed; looking it up by name"
        update = JobUpdate(error_code="ambiguous", error_message=note, note=note)
        try:
            moved = await self._ctx.store.transition(
                job.job_id, {JobState.SUBMITTING}, JobState.RECONCILE, update
            )
        except StaleTransitionError:
            return await self._ctx.store.get_job(job.job_id)
        log.warning("job.reconcile", reason=note)
        pending.entered_at = moved.updated_at
        return moved

    async def _adopt(self, job: Job, pending: _Pending, project_id: str) -> None:
        update = JobUpdate(
            project_id=project_id,
            submitted_at=pending.entered_at,
            progress=0.0,
            note=f"adopted project {project_id} found by export name",
            clear=frozenset({"error_code", "error_message", "last_progress_at"}),
        )
        try:
            adopted = await self._ctx.store.transition(
                job.job_id, {JobState.RECONCILE}, JobState.SUBMITTED, update
            )
        except StaleTransitionError:
            self._forget(job.job_id, await self._ctx.store.get_job(job.job_id))
            return
        self._pending.pop(job.job_id, None)
        log.info("job.adopted", project_id=project_id)
        self._on_adopted(adopted)

    async def _resubmit(self, job: Job, decision: ExportAgain) -> None:
        """Back to `mapped`: certainly not exported, so the paid call is due again."""
        update = JobUpdate(
            next_attempt_at=self._ctx.clock(),
            note=f"{decision.reason}; submitting again",
            clear=frozenset() if decision.keep_project else frozenset({"project_id"}),
        )
        try:
            await self._ctx.store.transition(
                job.job_id, {JobState.RECONCILE}, JobState.MAPPED, update
            )
        except StaleTransitionError:
            self._forget(job.job_id, await self._ctx.store.get_job(job.job_id))
            return
        log.warning("job.reconcile_not_exported", reason=decision.reason)
        self._forget(job.job_id, None)
        self._on_resubmit()

    async def _fail(self, job: Job, reason: str) -> None:
        await self._ctx.fail(job, {JobState.RECONCILE}, code="ambiguous", message=reason)
        self._forget(job.job_id, None)

    def _forget(self, job_id: str, job: Job | None) -> None:
        """Stop reconciling (the render slot follows the job's committed state, not this loop)."""
        del job
        self._pending.pop(job_id, None)
