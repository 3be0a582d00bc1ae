"""`submitted -> ready | failed`: one scheduler follows every render.

A heap of due polls and a single loop, instead of a sleeping task per job: thousands of renders
cost one task and a few polls each (timed from the observed progress rate). Callbacks only
bring a poll forward; what they say is never trusted. The API documents no failure state, so
a deadline and a stall watchdog decide when a render is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from service.jobs.after_poll import (
    POLL_RETRY_BASE_S,
    POLL_RETRY_CAP_S,
    Finished,
    GiveUp,
    PollAt,
    PollTiming,
    Reading,
    RenderSoFar,
    after_poll,
    after_poll_error,
    first_poll_at,
)
from service.jobs.context import DueHeap
from service.jobs.ports import (
    ApiError,
    CredentialsRefusedError,
    NothingCreatedError,
    ProgressApi,
    RefusedError,
)
from service.jobs.schedule import (
    Observation,
    render_time_sample,
    retry_delay,
    updated_estimate,
)
from service.jobs.submitter import sleep_or_wake
from service.log import get_logger
from service.model import Job, JobState, JobUpdate
from service.store.base import StaleTransitionError, StoreUnavailableError

if TYPE_CHECKING:
    from service.aistudios.responses import Progress
    from service.jobs.context import JobLoopContext

log = get_logger("jobs.tracker")

ReadyHook = Callable[[Job, float | None], None]
"""Told of each committed `ready` job and when its first accepted callback came (None: none)."""

MAX_PARALLEL_POLLS = 4
_KEPT_OBSERVATIONS = 8


__all__ = ["PollTiming", "ProgressApi", "ReadyHook", "Tracker", "ignore_ready"]


@dataclass(slots=True)
class _Render:
    """What the tracker remembers of one render between polls."""

    job_id: str
    observations: list[Observation]
    due_at: float = 0.0
    seq: int = 0
    polling: bool = False
    repoll: bool = False
    last_poll_at: float | None = None
    errors: int = field(default=0)
    callback_seen: bool = False
    first_callback_at: float | None = None
    first_guess_s: float = 0.0
    estimate_key: str = ""


def so_far(job: Job) -> RenderSoFar:
    """What the store holds of a job's render, for the poll decisions."""
    return RenderSoFar(job.submitted_at, job.progress, job.last_progress_at)


def route_of(job: Job) -> str:
    """The default estimate key: a route renders one template."""
    return job.route


def ignore_ready(job: Job, first_callback_at: float | None) -> None:
    """The default `ReadyHook`: nobody measures ready renders."""


def observations_of(job: Job) -> list[Observation]:
    """Rebuild the progress history of a job read from the store (after a restart, say)."""
    start = job.submitted_at if job.submitted_at is not None else job.updated_at
    observations = [Observation(start, 0.0)]
    if job.progress > 0 and job.last_progress_at is not None:
        observations.append(Observation(job.last_progress_at, job.progress))
    return observations


class Tracker:
    """Polls every submitted render at computed times; commits `ready` or `failed`."""

    def __init__(
        self,
        ctx: JobLoopContext[ProgressApi],
        *,
        timing: PollTiming,
        on_ready: ReadyHook = ignore_ready,
        estimate_key: Callable[[Job], str] = route_of,
    ) -> None:
        self._ctx = ctx
        self._timing = timing
        self._on_ready = on_ready
        self._estimate_key = estimate_key
        self._estimates: dict[str, float] = {}
        """Learned render time per template: where each render's first poll lands."""
        self._poll_permits = anyio.Semaphore(MAX_PARALLEL_POLLS)
        self._renders: dict[str, _Render] = {}
        self._due = DueHeap()
        self._wakeup = anyio.Event()

    @property
    def tracked(self) -> int:
        """How many renders are being followed."""
        return len(self._renders)

    async def load_estimates(self) -> None:
        """Read the render times learned before a restart."""
        self._estimates = await self._ctx.store.render_estimates()

    def estimate_s(self, key: str) -> float | None:
        """The learned render time of a template (its estimate key), if any render finished."""
        return self._estimates.get(key)

    def track(self, job: Job) -> None:
        """Follow a `submitted` job; its first poll is timed from what the job already shows.

        With nothing shown yet, the first poll comes when the template's renders have been
        finishing (learned from earlier jobs), or after `first_poll_seconds` for a new one.
        """
        key = self._estimate_key(job)
        render = _Render(
            job.job_id,
            observations_of(job),
            first_guess_s=self._estimates.get(key, self._timing.first_guess_s),
            estimate_key=key,
        )
        self._renders[job.job_id] = render
        due_at = first_poll_at(
            so_far(job),
            render.observations,
            now=self._ctx.clock(),
            timing=self._timing,
            first_guess_s=render.first_guess_s,
        )
        self._schedule(render, due_at)

    async def wake(self, job_id: str) -> None:
        """A callback arrived: poll this render now to confirm it.

        The first callback of a render skips the poll floor (AI Studios calls back when the
        render is done, so waiting would only add lag); later ones respect it, so a chatty
        sender can cost at most one extra poll per floor interval.
        """
        render = self._renders.get(job_id)
        if render is None:
            return
        if render.first_callback_at is None:
            render.first_callback_at = self._ctx.clock()
        self._bring_forward(render)

    def _bring_forward(self, render: _Render) -> None:
        """Poll a render that called back now, or once its poll under way has finished."""
        if render.polling:
            render.repoll = True
            return
        now = self._ctx.clock()
        first_callback = not render.callback_seen
        render.callback_seen = True
        earliest = (
            now
            if render.last_poll_at is None or first_callback
            else render.last_poll_at + self._timing.floor_s
        )
        due_at = max(now, earliest)
        if due_at < render.due_at:
            self._schedule(render, due_at)

    def _schedule(self, render: _Render, due_at: float) -> None:
        render.due_at = due_at
        render.seq = self._due.push(render.job_id, due_at)
        self._wakeup.set()

    async def run(self) -> None:
        """Forever: start the polls that are due (bounded), then sleep until the next one."""
        async with anyio.create_task_group() as tg:
            while True:
                self._wakeup = anyio.Event()
                while (entry := self._due.pop_due(self._ctx.clock())) is not None:
                    seq, job_id = entry
                    render = self._renders.get(job_id)
                    if render is None or render.seq != seq or render.polling:
                        continue
                    await self._poll_permits.acquire()
                    render.polling = True
                    tg.start_soon(self._poll_isolated, render, name=f"poll {job_id}")
                next_due = self._due.next_due()
                await sleep_or_wake(self._wakeup, next_due - self._ctx.clock(), self._ctx.sleep)

    async def _poll_isolated(self, render: _Render) -> None:
        """One poll; its failure is this job's, never the loop's."""
        with structlog.contextvars.bound_contextvars(job_id=render.job_id):
            try:
                await self.poll(render)
            except StoreUnavailableError as exc:
                log.warning("job.poll_deferred", error=str(exc))
                self._retry_later(render, exc)
            except StaleTransitionError as exc:
                # Another worker claimed the job since (or it was purged): it tracks it now.
                log.info("job.tracking_handed_over", reason=str(exc))
                self._forget(render.job_id, None, render)
            except Exception as exc:
                log.exception("job.poll_crashed")
                await self._fail_crashed(render, f"internal error while tracking: {exc!r}")
            finally:
                self._poll_permits.release()
                render.polling = False
                if render.repoll and self._renders.get(render.job_id) is render:
                    render.repoll = False
                    self._bring_forward(render)

    async def poll(self, render: _Render) -> None:
        """Read the render's progress once and commit whatever it means."""
        job = await self._ctx.store.get_job(render.job_id)
        if job is None or job.state is not JobState.SUBMITTED:
            self._forget(render.job_id, job, render)
            return
        if job.project_id is None:
            await self._fail(job, "internal_error", "submitted without a project id")
            return
        try:
            progress = await self._read(job)
        except ApiError as exc:
            await self._poll_failed(job, render, exc)
            return
        now = self._ctx.clock()
        render.last_poll_at = now
        render.errors = 0
        render.observations.append(Observation(now, progress.progress))
        del render.observations[1:-_KEPT_OBSERVATIONS]
        decision = after_poll(
            Reading(progress.progress, progress.done),
            so_far(job),
            render.observations,
            now=now,
            timing=self._timing,
            first_guess_s=render.first_guess_s,
        )
        if isinstance(decision, Finished):
            await self._ready(job, render, progress, now, decision.moved_at)
            return
        await self._ctx.store.update_job(
            job.job_id,
            JobUpdate(
                progress=progress.progress, polls=job.polls + 1, last_progress_at=decision.moved_at
            ),
        )
        if isinstance(decision, GiveUp):
            await self._fail(job, decision.code, decision.message)
            return
        self._schedule(render, decision.at)

    async def _read(self, job: Job) -> Progress:
        project_id = job.project_id or ""
        if job.api == "legacy":
            return await self._ctx.api.progress_legacy(project_id)
        return await self._ctx.api.progress_v3(project_id)

    async def _ready(
        self,
        job: Job,
        render: _Render,
        progress: Progress,
        now: float,
        last_progress_at: float | None,
    ) -> None:
        """`ready` and its `video.ready` rows in one transaction: announced exactly with it.

        The ready hook hears of it only once that commit succeeded.
        """
        ready = dataclasses.replace(
            job,
            state=JobState.READY,
            progress=progress.progress,
            download_url=progress.download_url,
            ready_at=now,
            polls=job.polls + 1,
            last_progress_at=last_progress_at,
            updated_at=now,
        )
        update = JobUpdate(
            progress=progress.progress,
            download_url=progress.download_url,
            ready_at=now,
            polls=ready.polls,
            last_progress_at=last_progress_at,
            note=f"ready after {ready.polls} polls",
        )
        announcements = self._ctx.outbox_for(ready, "video.ready")
        # Learned before the ready commit, so whoever sees the job ready sees the estimate too.
        await self._learn(render, now)
        try:
            committed = await self._ctx.store.transition(
                job.job_id, {JobState.SUBMITTED}, JobState.READY, update, announcements
            )
        except StaleTransitionError:
            log.info("job.ready_raced")
            self._forget(job.job_id, await self._ctx.store.get_job(job.job_id), render)
            return
        log.info("job.ready", polls=ready.polls)
        self._forget(job.job_id, None, render)
        self._tell_ready(committed, render.first_callback_at)
        if not announcements:
            # Nobody subscribed to video.ready: there is nothing to deliver, so it is done.
            with contextlib.suppress(StaleTransitionError):
                await self._ctx.store.transition(
                    job.job_id,
                    {JobState.READY},
                    JobState.NOTIFIED,
                    JobUpdate(note="no notify target takes video.ready"),
                )

    async def _learn(self, render: _Render, ready_at: float) -> None:
        """Fold this render's length into its template's estimate, kept across restarts.

        Best effort: a store outage loses one sample, never the job (it is already ready).
        """
        sample_s = render_time_sample(render.observations, ready_at)
        estimate_s = updated_estimate(self._estimates.get(render.estimate_key), sample_s)
        self._estimates[render.estimate_key] = estimate_s
        try:
            await self._ctx.store.save_render_estimate(render.estimate_key, estimate_s)
        except StoreUnavailableError as exc:
            log.warning("render_estimate.save_failed", error=str(exc))

    def _tell_ready(self, job: Job, first_callback_at: float | None) -> None:
        """Run the ready hook; its failure is logged, never the job's (it is already ready)."""
        try:
            self._on_ready(job, first_callback_at)
        except Exception:
            log.exception("job.ready_hook_failed")

    async def _poll_failed(self, job: Job, render: _Render, exc: ApiError) -> None:
        """Reads are repeatable: back off (Retry-After exactly), unless the API refused."""
        if isinstance(exc, NothingCreatedError):
            self._ctx.gate.throttled(exc)
        render.errors += 1
        decision = after_poll_error(
            refused=isinstance(exc, RefusedError) and not isinstance(exc, CredentialsRefusedError),
            retry_after_s=exc.retry_after_s if isinstance(exc, NothingCreatedError) else None,
            message=exc.message,
            errors=render.errors,
            render=so_far(job),
            now=self._ctx.clock(),
            timing=self._timing,
            rng=self._ctx.rng,
        )
        if isinstance(decision, PollAt):
            log.warning("job.poll_failed", error=exc.message)
            self._schedule(render, decision.at)
            return
        await self._fail(job, decision.code, decision.message)

    def _retry_later(self, render: _Render, exc: BaseException) -> None:
        """The store failed the poll's read or write: poll again after a back-off."""
        render.errors += 1
        delay = retry_delay(
            exc, render.errors, base_s=POLL_RETRY_BASE_S, cap_s=POLL_RETRY_CAP_S, rng=self._ctx.rng
        )
        self._schedule(render, self._ctx.clock() + delay)

    async def _fail(self, job: Job, code: str, message: str) -> None:
        await self._ctx.fail(job, {JobState.SUBMITTED}, code=code, message=message)
        self._forget(job.job_id, None)

    async def _fail_crashed(self, render: _Render, reason: str) -> None:
        """A bug while tracking fails the job with the reason (an operator may retry it)."""
        try:
            job = await self._ctx.store.get_job(render.job_id)
            if job is not None and job.state is JobState.SUBMITTED:
                await self._fail(job, "internal_error", reason)
            else:
                self._forget(render.job_id, job, render)
        except StoreUnavailableError as exc:
            self._retry_later(render, exc)

    def _forget(self, job_id: str, job: Job | None, render: _Render | None = None) -> None:
        """Stop following a render (its slot follows the job's committed state, not this loop).

        With `render`, only if that is still the one followed: while a refused move was being
        settled, this worker's own take-over may have claimed the job again and started
        following it afresh. Dropping that render would leave the job `submitted` under a
        lease this worker keeps renewing, so no other worker would ever take it over.
        """
        del job
        if render is None or self._renders.get(job_id) is render:
            self._renders.pop(job_id, None)
