"""`mapped -> submitting -> submitted`: the one place that spends money.

THE MONEY RULE: `submitting` (attempts + 1) is committed BEFORE the paid POST, in the same
transaction as the spending caps' check and the spend record (`Store.spend_or_hold`: a job
over a cap goes `held` instead, and no POST leaves), so a crash at
any point leaves a job that says "a POST may have happened" and is reconciled instead of
being posted again. After the POST, only a retryable error (nothing was created) sends the job
back to `mapped`; anything uncertain goes to `reconcile`.

No gap between that commit and the request: the job holds its render slot and takes its turn
at the request gate first, then commits, then the POST leaves at once. A crash while a job
waits leaves it `mapped`; only a request actually on the wire can be in doubt.

The two-step v3 flow (the default) first creates the project unexported (not billed); its id
is committed with `submitting`, and the paid call then exports that project. An uncertain
export is settled by reading it (`reconcile.py`); a draft lost before that commit (a crash, a
lost response) is simply created again.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog

from service.aistudios.paid_requests import TEMPLATE_MODIFY_API
from service.backoff import backoff_delay
from service.jobs.after_post import (
    Created,
    Fail,
    PostOutcome,
    Proceed,
    Reconcile,
    RetryAt,
    after_draft,
    after_export,
    outcome_of,
)
from service.jobs.cache import render_key, reuse_since
from service.jobs.decide import Step, resume_step
from service.jobs.ports import (
    ApiError,
    ExportApi,
    NothingCreatedError,
    Sleep,
    UrlProbe,
)
from service.jobs.ratelimit import Turn
from service.log import get_logger
from service.model import (
    API_LEGACY,
    API_V3,
    Job,
    JobState,
    JobUpdate,
    NewOutboxMessage,
    SpendCap,
)
from service.store.base import StaleTransitionError, StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Collection

    from service.jobs.context import JobLoopContext

log = get_logger("jobs.submitter")

RETRY_BASE_S = 2.0
"""How long a job whose submit met a store outage is held back before it is tried again."""
SCAN_RETRY_S = 1.0
"""How soon a loop reads its queue again after the store failed the read (an outage, not a bug)."""
_COMMIT_ATTEMPTS = 6
_SCAN_LIMIT = 500


__all__ = ["ExportApi", "Submitter", "paid_endpoint", "sleep_or_wake"]


@dataclass(frozen=True)
class RenderCache:
    """What the render cache needs: each job's window, the URL probe, the hit counter."""

    seconds_for: Callable[[Job], float | None]
    probe: UrlProbe
    on_hit: Callable[[Job], None] = lambda _job: None


CapsFor = Callable[[Job], Sequence[SpendCap]]
"""The spending caps a job's paid call must stay under right now."""


def no_caps(_job: Job) -> Sequence[SpendCap]:
    """No spending cap configured."""
    return ()


ClaimMapped = Callable[[str], Awaitable[Job | None]]
"""Claim one `mapped` job for this worker; None when another worker's lease holds it."""


def paid_endpoint(job: Job) -> str:
    """The client endpoint name of a job's paid call (the request gate's turn is per name)."""
    if job.api == API_LEGACY:
        return "legacy.export"
    if job.api == TEMPLATE_MODIFY_API:
        return "v3.template_modify"
    return "v3.project_export" if job.api == API_V3 else "v3.export"


class UnusableBodyError(ValueError):
    """The stored export body cannot be sent: nothing to POST, so the job fails before paying."""


def callback_url(public_url: str, job_id: str, token: str) -> str:
    """The per-job callback address AI Studios is given (unguessable through its token)."""
    return f"{public_url.rstrip('/')}/callbacks/{job_id}/{token}"


def decode_body(job: Job) -> dict[str, Any]:
    """The stored export request; v3 wants an object, legacy an object with `scenes`."""
    if job.export_body is None:
        raise UnusableBodyError("job has no export body")
    try:
        body = orjson.loads(job.export_body)
    except orjson.JSONDecodeError as exc:
        raise UnusableBodyError(f"export body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UnusableBodyError("export body is not a JSON object")
    if job.api == API_LEGACY and not isinstance(body.get("scenes"), list):
        raise UnusableBodyError("legacy export body has no scenes list")
    return body


async def sleep_or_wake(wakeup: anyio.Event, seconds: float, sleep: Sleep) -> None:
    """Wait `seconds` on the injected sleep, or less when `wakeup` is set."""
    if wakeup.is_set():
        return
    if math.isinf(seconds):
        await wakeup.wait()
        return
    async with anyio.create_task_group() as tg:

        async def sleeper() -> None:
            await sleep(max(seconds, 0.0))
            tg.cancel_scope.cancel()

        async def waiter() -> None:
            await wakeup.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(sleeper)
        tg.start_soon(waiter)


class Submitter:
    """Posts due `mapped` jobs, each holding a render slot, and routes every outcome."""

    def __init__(
        self,
        ctx: JobLoopContext[ExportApi],
        *,
        max_retries: int,
        public_url: str | None,
        on_submitted: Callable[[Job], None],
        on_reconcile: Callable[[Job], None],
        claim: ClaimMapped,
        claim_wait_s: float,
        may_pay: Callable[[Job], Awaitable[bool]],
        caps: CapsFor = no_caps,
        on_held: Callable[[Job], None] = lambda _job: None,
        cache: RenderCache | None = None,
    ) -> None:
        self._ctx = ctx
        self._probe = cache.probe if cache is not None else None
        self._cache_s = cache.seconds_for if cache is not None else (lambda _job: None)
        self._on_reused = cache.on_hit if cache is not None else (lambda _job: None)
        self._caps = caps
        self._on_held = on_held
        self._claim = claim
        self._may_pay = may_pay
        self._claim_wait_s = claim_wait_s
        self._max_retries = max_retries
        self._public_url = public_url
        self._on_submitted = on_submitted
        self._on_reconcile = on_reconcile
        self._active: set[str] = set()
        self._held_back: dict[str, float] = {}
        self._wakeup = anyio.Event()
        self._draining = False
        self._idle = anyio.Event()
        self._idle.set()

    def _announce_exhausted(self, job: Job, cap: SpendCap) -> Sequence[NewOutboxMessage]:
        """The `budget.exhausted` rows, inserted by the store once per exhausted period."""
        del cap  # the held job's error message names the period and its cap
        return self._ctx.outbox_for(job, "budget.exhausted")

    def wake(self) -> None:
        """New or returned `mapped` jobs: scan again now."""
        self._wakeup.set()

    async def drain(self) -> None:
        """Start no new export, and return once every export under way has its outcome committed.

        Shutdown calls this within its grace period, so a SIGTERM during a POST records the
        project id instead of leaving the job for reconciliation.
        """
        self._draining = True
        self.wake()
        await self._idle.wait()

    async def run(self) -> None:
        """Forever: post every due mapped job as slots allow, then sleep until the next is due."""
        async with anyio.create_task_group() as tg:
            while True:
                self._wakeup = anyio.Event()
                next_due = await self._dispatch_due(tg)
                await sleep_or_wake(self._wakeup, next_due - self._ctx.clock(), self._ctx.sleep)

    async def _dispatch_due(self, tg: anyio.abc.TaskGroup) -> float:
        """Start a submit task for each due job; return when the next one is due."""
        if self._draining:
            return math.inf
        try:
            jobs = await self._ctx.store.jobs_in_states({JobState.MAPPED}, limit=_SCAN_LIMIT)
        except StoreUnavailableError as exc:
            log.warning("jobs.scan_failed", state=JobState.MAPPED, error=str(exc))
            return self._ctx.clock() + SCAN_RETRY_S
        next_due = math.inf
        for job in jobs:
            if job.job_id in self._active:
                continue
            due = max(job.next_attempt_at or 0.0, self._held_back.get(job.job_id, 0.0))
            if due > self._ctx.clock():
                next_due = min(next_due, due)
                continue
            await self._ctx.slots.reserve(job.job_id)
            if self._draining:
                self._ctx.slots.unreserve(job.job_id)
                break
            self._active.add(job.job_id)
            if self._idle.is_set():
                self._idle = anyio.Event()
            tg.start_soon(self._submit_isolated, job.job_id, name=f"submit {job.job_id}")
        return next_due

    async def _submit_isolated(self, job_id: str) -> None:
        """One job's submit; its failure is logged and held back, never the loop's."""
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                await self.submit(job_id)
            except StoreUnavailableError as exc:
                log.warning("job.submit_deferred", error=str(exc))
                self._held_back[job_id] = self._ctx.clock() + RETRY_BASE_S
            except Exception as exc:
                log.exception("job.submit_crashed")
                await self._fail_if_still_mapped(job_id, f"internal error before export: {exc!r}")
            finally:
                # The submit's reservation ends here, always; a job now rendering keeps its
                # slot through its committed state (see RenderSlots).
                self._ctx.slots.unreserve(job_id)
                self._active.discard(job_id)
                if not self._active:
                    self._idle.set()
                if not self._ctx.slots.holds(job_id):
                    # Back to `mapped` with a due time, held, or failed: the queue changed.
                    # A job now rendering left it for good, so a burst's wave of submits
                    # does not rescan the queue once per job.
                    self.wake()

    async def submit(self, job_id: str) -> None:
        """Claim one mapped job (its slot already reserved), post it and commit what happened."""
        self._held_back.pop(job_id, None)
        job = await self._claim(job_id)
        if job is None:
            # Another worker holds it, or it left `mapped`: look again once a lease could end.
            self._held_back[job_id] = self._ctx.clock() + self._claim_wait_s
            return
        try:
            body = decode_body(job)
        except UnusableBodyError as exc:
            await self._fail(job, {JobState.MAPPED}, "unusable_body", str(exc))
            return
        key = render_key(job.api, body)
        if await self._reused(job, key):
            return
        if resume_step(job.state, job.api, job.project_id) is Step.CREATE_DRAFT:
            project_id = await self._create_draft(job, body)
            if project_id is None:
                return
            # Committed with `submitting`, one write fewer per job: a crash before that
            # commit loses only an unbilled draft, and the job is drafted again.
            job = dataclasses.replace(job, project_id=project_id)
        token = secrets.token_urlsafe(24) if self._public_url and job.api != API_LEGACY else None
        async with self._ctx.gate.turn(paid_endpoint(job)) as turn:
            try:
                job = await self._ctx.store.spend_or_hold(
                    job_id,
                    self._caps(job),
                    JobUpdate(
                        attempts=job.attempts + 1,
                        callback_token=token,
                        render_key=key,
                        project_id=job.project_id,
                    ),
                    self._announce_exhausted,
                )
            except StaleTransitionError:
                return
            if job.state is JobState.HELD:
                log.warning("job.held", reason=job.error_message)
                self._on_held(job)
                return
            # From here on a billed export may exist: never back to `mapped` unless certain.
            await self._post_and_record(job, body, token, turn)

    async def _reused(self, job: Job, key: str) -> bool:
        """The render cache: end the job with an identical earlier video, if it still downloads.

        Only a job of a route with `cache_seconds` asks; the earlier video must have been
        exported itself within the window, and its URL is probed first (the vendor documents
        no URL lifetime): a URL that no longer downloads means exporting normally.
        """
        since = reuse_since(self._ctx.clock(), self._cache_s(job))
        if since is None or self._probe is None:
            return False
        earlier = await self._ctx.store.cached_render(key, since)
        if earlier is None or earlier.job_id == job.job_id or earlier.download_url is None:
            return False
        if not await self._probe.downloads(earlier.download_url):
            log.info("cache.miss_url_gone", earlier_job_id=earlier.job_id)
            return False
        now = self._ctx.clock()
        update = JobUpdate(
            download_url=earlier.download_url,
            ready_at=now,
            progress=100.0,
            render_key=key,
            reused_from=earlier.job_id,
            note=f"reused the video of {earlier.job_id}",
        )
        ready = dataclasses.replace(
            job,
            state=JobState.READY,
            download_url=earlier.download_url,
            ready_at=now,
            progress=100.0,
            reused_from=earlier.job_id,
        )
        try:
            moved = await self._ctx.store.transition(
                job.job_id,
                {JobState.MAPPED},
                JobState.READY,
                update,
                self._ctx.outbox_for(ready, "video.ready"),
            )
        except StaleTransitionError:
            return True
        log.info("job.reused", reused_from=earlier.job_id)
        self._on_reused(moved)
        return True

    async def _create_draft(self, job: Job, body: dict[str, Any]) -> str | None:
        """Step one of the two-step flow: an unbilled draft, whose id the caller commits.

        What happens next is `after_draft`'s decision; this only carries it out. None when
        the job was failed or scheduled to try again.
        """
        try:
            outcome: PostOutcome = Created(
                await self._ctx.api.create_draft_v3(body, name=job.export_name)
            )
        except ApiError as exc:
            outcome = self._heard(exc)
        decision = after_draft(
            outcome,
            attempts=job.attempts,
            max_retries=self._max_retries,
            now=self._ctx.clock(),
            rng=self._ctx.rng,
        )
        if isinstance(decision, Fail):
            if decision.code == "retries_exhausted":
                # The same budget as the paid call's: `attempts` counts tries of either step.
                job = await self._ctx.store.update_job(
                    job.job_id, JobUpdate(attempts=job.attempts + 1)
                )
            await self._fail(job, {JobState.MAPPED}, decision.code, decision.message)
            return None
        if isinstance(decision, RetryAt):
            await self._ctx.store.update_job(
                job.job_id,
                JobUpdate(
                    attempts=job.attempts + 1,
                    next_attempt_at=decision.at,
                    error_code=decision.code,
                    error_message=decision.message,
                ),
            )
            log.info(
                "job.draft_retry_scheduled",
                delay_s=round(decision.at - self._ctx.clock(), 3),
                error=decision.message,
            )
            return None
        # At debug: `job.exporting` right after names the same project id at info, and one
        # line fewer per job is CPU a burst's last exports no longer wait behind.
        log.debug("job.drafted", project_id=decision.project_id)
        return decision.project_id

    def _heard(self, exc: ApiError) -> PostOutcome:
        """Classify a failed POST; a refusal for load also slows the request gate down."""
        if isinstance(exc, NothingCreatedError):
            self._ctx.gate.throttled(exc)
        return outcome_of(exc)

    async def _post_and_record(
        self, job: Job, body: dict[str, Any], token: str | None, turn: Turn
    ) -> None:
        """The paid call, then the commit `after_export` decides (the loop only carries it out).

        The render started somewhere between the request leaving and its answer arriving:
        `submitted_at` is when it left (after any Retry-After pause that held it), so progress
        read later never looks faster than it is and the poll timed from it never lands
        before the finish.
        """
        if not await self._claim_held_at_send(job):
            return
        sent_at = self._ctx.clock()
        try:
            outcome: PostOutcome = Created(await self._post(job, body, token))
        except ApiError as exc:
            outcome = self._heard(exc)
        except Exception as exc:
            log.exception("job.export_crashed")
            outcome = outcome_of(exc)
        decision = after_export(
            outcome,
            attempts=job.attempts,
            max_retries=self._max_retries,
            now=self._ctx.clock(),
            rng=self._ctx.rng,
        )
        if isinstance(decision, Proceed):
            await self._record_submitted(job, decision.project_id, sent_at + turn.held_s)
        elif isinstance(decision, Reconcile):
            await self._to_reconcile(job, decision.reason)
        elif isinstance(decision, RetryAt):
            await self._retry_later(job, decision)
        else:
            await self._fail_after_post(job, decision.code, decision.message)

    async def _claim_held_at_send(self, job: Job) -> bool:
        """Check the claim last, once no Retry-After pause can hold the request after it.

        False: nothing is sent. Another worker holds the job and settles it by reading the
        project; or the store could not confirm the claim, and reconciling settles it.
        """
        while True:
            await self._ctx.gate.pause_over()
            try:
                if not await self._may_pay(job):
                    return False
            except StoreUnavailableError as exc:
                await self._to_reconcile(job, f"claim unconfirmed, export not sent: {exc}")
                return False
            if not self._ctx.gate.paused:  # no pause began while the claim was checked
                return True

    async def _post(self, job: Job, body: dict[str, Any], token: str | None) -> str:
        log.info("job.exporting", attempt=job.attempts, api=job.api, project_id=job.project_id)
        if job.api == API_LEGACY:
            return await self._ctx.api.export_legacy(body["scenes"])
        webhook = (
            callback_url(self._public_url, job.job_id, token)
            if self._public_url and token
            else None
        )
        if job.api == TEMPLATE_MODIFY_API:  # a server-side template: same name-based safety
            return await self._ctx.api.template_modify(
                body["templateId"], body["updates"], name=job.export_name, webhook_url=webhook
            )
        if job.api == API_V3 and job.project_id is not None:
            return await self._ctx.api.export_project_v3(job.project_id, webhook_url=webhook)
        return await self._ctx.api.export_v3(body, name=job.export_name, webhook_url=webhook)

    async def _record_submitted(self, job: Job, project_id: str, sent_at: float) -> None:
        update = JobUpdate(
            project_id=project_id,
            submitted_at=sent_at,
            progress=0.0,
            polls=0,
            note=f"attempt {job.attempts}: project {project_id}",
            clear=frozenset({"error_code", "error_message", "next_attempt_at", "last_progress_at"}),
        )
        submitted = await self._commit_persistently(
            job, JobState.SUBMITTED, self._transition(job, JobState.SUBMITTED, update)
        )
        if submitted is not None:
            log.info("job.submitted", project_id=project_id)
            self._on_submitted(submitted)

    async def _to_reconcile(self, job: Job, reason: str) -> None:
        update = JobUpdate(error_code="ambiguous", error_message=reason, note=reason)
        moved = await self._commit_persistently(
            job, JobState.RECONCILE, self._transition(job, JobState.RECONCILE, update)
        )
        if moved is not None:
            log.warning("job.reconcile", reason=reason)
            self._on_reconcile(moved)

    async def _commit_persistently(
        self, job: Job, to_state: JobState, commit: Callable[[], Awaitable[Job | None]]
    ) -> Job | None:
        """Commit the outcome of a POST, retrying a briefly unavailable store.

        `commit` is one `submitting -> to_state` write; None (or StaleTransitionError) means
        another path moved the job. Giving up hands the job, still in `submitting`, to the
        reconciler, exactly as a restart would.
        """
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                moved = await commit()
            except StaleTransitionError:
                moved = None
            except StoreUnavailableError as exc:
                log.warning("job.commit_retry", to_state=to_state, attempt=attempt, error=str(exc))
                await self._ctx.sleep(
                    backoff_delay(attempt, base_s=0.5, cap_s=8.0, rng=self._ctx.rng)
                )
                continue
            if moved is None:
                log.warning("job.moved_during_export", to_state=to_state)
            return moved
        log.error("job.commit_gave_up", to_state=to_state)
        self._on_reconcile(job)
        return None

    def _transition(
        self, job: Job, to_state: JobState, update: JobUpdate
    ) -> Callable[[], Awaitable[Job | None]]:
        """One `submitting -> to_state` write, for `_commit_persistently` to repeat."""

        async def commit() -> Job | None:
            return await self._ctx.store.transition(
                job.job_id, {JobState.SUBMITTING}, to_state, update
            )

        return commit

    async def _retry_later(self, job: Job, decision: RetryAt) -> None:
        """`submitting -> mapped`: the API said nothing was created, so it is sent again."""
        delay = decision.at - self._ctx.clock()
        update = JobUpdate(
            next_attempt_at=decision.at,
            error_code=decision.code,
            error_message=decision.message,
            note=f"nothing created ({decision.message}); retry in {delay:.1f}s",
        )
        returned = await self._commit_persistently(
            job, JobState.MAPPED, self._transition(job, JobState.MAPPED, update)
        )
        if returned is not None:
            log.info("job.retry_scheduled", delay_s=round(delay, 3), error=decision.message)

    async def _fail_after_post(self, job: Job, code: str, message: str) -> None:
        """`submitting -> failed`: the API said no export was made, so the verdict is final."""

        async def commit() -> Job | None:
            return await self._ctx.fail(job, {JobState.SUBMITTING}, code=code, message=message)

        await self._commit_persistently(job, JobState.FAILED, commit)

    async def _fail(
        self, job: Job, from_states: Collection[JobState], code: str, message: str
    ) -> None:
        await self._ctx.fail(job, from_states, code=code, message=message)

    async def _fail_if_still_mapped(self, job_id: str, reason: str) -> None:
        """A bug before the POST fails the job (nothing was paid); after it, restart reconciles."""
        job = await self._ctx.store.get_job(job_id)
        if job is not None and job.state is JobState.MAPPED:
            await self._fail(job, {JobState.MAPPED}, "internal_error", reason)
