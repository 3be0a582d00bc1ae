"""Jobs owned by a worker: claimed in the store, moved under their fence, counted in the budget.

A job is owned through the store, not through process memory: `claim` records an owner id, a
lease and a new fence on the job row. Every transition this worker makes names the fence it
holds, so once another worker (or this one after a restart) claimed the job again, the old
claimant's moves are refused. A heartbeat renews the leases; recovery and take-over pick up
only jobs whose lease ran out (or this owner's own, after a restart).

`OwnedJobs` is also the one place that hears every committed state of an owned job, so the
render slots are settled here and nowhere else.

Fencing refuses a stale claimant's *commits*, but not its requests: a worker paused (SIGSTOP,
a VM freeze, a long GC) between its `submitting` commit and the export POST could wake after
another worker took the job over and exported it, and still send its own POST. So the paid
request leaves only while this worker's own claim is provably young (`claim_is_fresh`, on
the local monotonic clock, which keeps counting while a process is stopped); an older claim
is renewed with a fresh, fenced claim first, and a job another worker holds is not paid for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.log import get_logger
from service.model import TERMINAL_STATES, JobState
from service.store.base import FencedError

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence

    from service.jobs.ratelimit import RenderSlots
    from service.model import Job, JobUpdate, NewOutboxMessage, SpendCap
    from service.store.base import Store

log = get_logger("jobs.ownership")

LEASE_S = 15.0
"""How long a claim holds without renewal: the longest a crashed worker's jobs wait for
another worker (a restart under the same owner id takes them back at once)."""

PAY_WITHIN_LEASE = 0.5
"""The share of a lease within which a paid request may leave after its claim: the other half
is the margin for a pause between the check and the send and for clocks that drift apart."""


def claim_is_fresh(now: float, claimed_at: float | None, lease_s: float) -> bool:
    """Whether a claim asked for at monotonic `claimed_at` still clearly holds.

    `claimed_at` is read *before* the claim is asked for, so the store's lease ends no earlier
    than `claimed_at + lease_s`; None (no claim known) is never fresh.
    """
    return claimed_at is not None and now - claimed_at < lease_s * PAY_WITHIN_LEASE


class OwnedJobs:
    """The `JobStore` the job loops use: the real store, under this worker's claims."""

    def __init__(
        self,
        store: Store,
        slots: RenderSlots,
        *,
        owner: str,
        lease_s: float = LEASE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._slots = slots
        self.owner = owner
        self.lease_s = lease_s
        self._monotonic = monotonic
        self._fences: dict[str, int] = {}
        self._claimed_at: dict[str, float] = {}

    def fence_of(self, job_id: str) -> int | None:
        """The fence this worker holds on `job_id`, or None when it holds no claim."""
        return self._fences.get(job_id)

    async def claim(self, job_id: str, states: Collection[JobState]) -> Job | None:
        """Claim one job in `states` unless another worker's lease holds it."""
        asked_at = self._monotonic()
        job = await self._store.claim_job(job_id, states, owner=self.owner, lease_s=self.lease_s)
        if job is not None:
            self._own(job, asked_at)
        return job

    async def may_pay(self, job: Job) -> bool:
        """Whether the paid request for `job` (committed `submitting`) may leave now.

        A young claim answers at once, with no I/O (the usual case: the commit came right
        after the claim). An older one, after a long draft create or a Retry-After pause, is
        claimed afresh first; if another worker holds the job by then, the request is not
        sent, and that worker settles the export by reading the project.
        """
        if claim_is_fresh(self._monotonic(), self._claimed_at.get(job.job_id), self.lease_s):
            return True
        held = self._fences.get(job.job_id)
        fresh = await self.claim(job.job_id, {job.state})
        if fresh is None:
            log.warning("job.export_withheld", job_id=job.job_id, reason="claim lapsed")
            self._lose(job.job_id, held)
            return False
        return True

    async def claim_free(
        self, states: Collection[JobState], limit: int, *, take_own: bool
    ) -> list[Job]:
        """Claim free jobs in `states`; `take_own` only at start.

        A restart takes its own jobs back at once; later scans take over only jobs of other
        workers whose leases expired.
        """
        asked_at = self._monotonic()
        jobs = await self._store.claim_jobs(
            states, owner=self.owner, lease_s=self.lease_s, limit=limit, take_own=take_own
        )
        for job in jobs:
            self._own(job, asked_at)
        return jobs

    async def renew(self) -> int:
        """Extend every lease this worker holds (the heartbeat)."""
        return await self._store.renew_leases(self.owner, self.lease_s)

    def _own(self, job: Job, asked_at: float) -> None:
        self._fences[job.job_id] = job.fence
        self._claimed_at[job.job_id] = asked_at
        self._slots.settle(job.job_id, job.state)

    async def get_job(self, job_id: str) -> Job | None:
        """Read one job."""
        return await self._store.get_job(job_id)

    async def jobs_in_states(self, states: Collection[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of these states, oldest first."""
        return await self._store.jobs_in_states(states, limit)

    async def transition(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        update: JobUpdate | None = None,
        outbox: Sequence[NewOutboxMessage] = (),
    ) -> Job:
        """Move a job under this worker's fence; the render slot follows the committed state."""
        fence = self._fences.get(job_id)
        try:
            job = await self._store.transition(
                job_id, from_states, to_state, update, outbox, fence=fence
            )
        except FencedError:
            self._lose(job_id, fence)
            raise
        # A stale move means another of this worker's moves won (and settled the slot) or an
        # operator moved a finished job: nothing to settle here.
        self._settle(job)
        return job

    async def spend_or_hold(
        self,
        job_id: str,
        caps: Sequence[SpendCap],
        update: JobUpdate,
        announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
    ) -> Job:
        """The paid call's commit under the caps, fenced; the slot follows the committed state."""
        fence = self._fences.get(job_id)
        try:
            job = await self._store.spend_or_hold(job_id, caps, update, announce, fence=fence)
        except FencedError:
            self._lose(job_id, fence)
            raise
        self._settle(job)
        return job

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        """The latest exported job with this render key ready since `since`."""
        return await self._store.cached_render(render_key, since)

    async def spend_counts(self, since: float) -> dict[str, int]:
        """Billed exports recorded since `since`, per route."""
        return await self._store.spend_counts(since)

    async def save_render_estimate(self, key: str, seconds: float) -> None:
        """Keep the learned render time of `key` across restarts."""
        await self._store.save_render_estimate(key, seconds)

    async def render_estimates(self) -> dict[str, float]:
        """Every learned render time by key."""
        return await self._store.render_estimates()

    async def update_job(self, job_id: str, update: JobUpdate) -> Job:
        """Change fields under this worker's fence."""
        fence = self._fences.get(job_id)
        try:
            return await self._store.update_job(job_id, update, fence=fence)
        except FencedError:
            self._lose(job_id, fence)
            raise

    def _settle(self, job: Job) -> None:
        """A committed state of an owned job: its slot follows it; a finished job is let go.

        Ready and ended jobs are never claimed again (a retry claims afresh), so their fence
        and claim time are dropped: a long-running daemon keeps one entry per job in flight,
        not one per job it ever saw.
        """
        self._slots.settle(job.job_id, job.state)
        if job.state is JobState.READY or job.state in TERMINAL_STATES:
            self._fences.pop(job.job_id, None)
            self._claimed_at.pop(job.job_id, None)

    def _lose(self, job_id: str, refused: int | None) -> None:
        """Another worker claimed the job since: it is no longer ours to move or count.

        `refused` is the fence the refused write carried. If this worker claimed the job again
        while that write was under way (its own take-over scan), the job is ours under the new
        fence and keeps its slot: letting go then would free a slot of a job still rendering
        here. The stale fence is kept, not dropped: a move without a fence is not checked at
        all, so forgetting it would let this worker's next move of the job (a failure verdict
        after the refused poll, say) through. Only a new claim replaces it.
        """
        if self._fences.get(job_id) != refused:
            log.info("job.claim_renewed_meanwhile", job_id=job_id, refused_fence=refused)
            return
        log.warning("job.claim_lost", job_id=job_id, fence=refused)
        self._claimed_at.pop(job_id, None)
        self._slots.settle(job_id, None)
