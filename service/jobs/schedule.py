"""When to poll, when to retry, when to give up: pure timing decisions, tested with a fake clock.

Every poll and every retry is an API request against a service with undocumented limits, so
the timing is computed rather than fixed: a render is polled shortly after its estimated
finish (a handful of polls whatever its length), retries spread out with full jitter, and a
server's Retry-After is obeyed to the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from service.backoff import RandomSource, backoff_delay
from service.jobs.ports import Clock, NothingCreatedError, Sleep

if TYPE_CHECKING:
    from collections.abc import Sequence

    from service.model import Job

FULL_PROGRESS = 100.0
ESTIMATE_WEIGHT = 0.3
"""How much one finished render moves a learned render-time estimate (an EWMA)."""
EARLIER_NEXT_TIME = 0.8
"""A render already finished at its first poll ran at most that long: the next first poll
comes this much earlier, so the estimate never creeps upward by its own detection delay."""
FINISH_MARGIN = 0.02
"""Poll this fraction of the estimated remaining time after the estimated finish."""
FINISH_SLACK_S = 0.02
"""And this much more: a reading's own latency. The predicted finish already errs late, since
a render starts after its export was sent (`submitted_at`, the first observation)."""

Verdict = Literal["deadline", "stalled"]

__all__ = [
    "Clock",
    "Observation",
    "Sleep",
    "next_poll_delay",
    "render_time_sample",
    "render_verdict",
    "retry_delay",
    "updated_estimate",
    "verdict_at",
]


@dataclass(frozen=True, slots=True)
class Observation:
    """One reading of a render's progress (0-100) at a time; the first is the submit itself."""

    at: float
    progress: float


def _clamp(value: float, floor_s: float, ceiling_s: float) -> float:
    return max(floor_s, min(ceiling_s, value))


def next_poll_delay(
    observations: Sequence[Observation],
    now: float,
    *,
    floor_s: float,
    ceiling_s: float,
    first_guess_s: float,
) -> float:
    """Seconds from `now` to the next progress poll of one render.

    The render's finish is extrapolated from the latest progress rate and the poll lands just
    after it; while nothing moves, the wait grows with the time already waited (geometric
    back-off), so a queued or stuck render costs few polls too. Before any progress is seen the
    first poll comes `first_guess_s` after submit (the configured `first_poll_seconds`): a short
    render is caught early, a long one costs one extra poll.
    """
    if not observations:
        return _clamp(first_guess_s, floor_s, ceiling_s)
    start, last = observations[0], observations[-1]
    if last.progress <= start.progress:
        if len(observations) == 1:
            return _clamp(start.at + first_guess_s - now, floor_s, ceiling_s)
        return _clamp(now - start.at, floor_s, ceiling_s)
    changed_at = _last_change_at(observations)
    previous = _last_lower(observations, last.progress)
    rate = (last.progress - previous.progress) / max(changed_at - previous.at, 1e-9)
    remaining_s = max(FULL_PROGRESS - last.progress, 0.0) / rate
    finish_at = changed_at + remaining_s * (1 + FINISH_MARGIN) + FINISH_SLACK_S
    delay = finish_at - now
    if last.at > changed_at:
        # Polled since the last change and saw none: the estimate was too early; back off.
        delay = max(delay, now - changed_at)
    return _clamp(delay, floor_s, ceiling_s)


def render_time_sample(observations: Sequence[Observation], ready_at: float) -> float:
    """How long a finished render took, as well as its polls can tell, for the estimate.

    A reading below 100 extrapolates linearly to the full length (the progress models the
    render); a render already finished at its first poll only bounds the length from above,
    so the sample is taken a little earlier than that bound.
    """
    start = observations[0]
    elapsed_s = max(ready_at - start.at, 0.0)
    partial = [o for o in observations[1:] if 0 < o.progress < FULL_PROGRESS]
    if partial:
        last = partial[-1]
        return min(elapsed_s, (last.at - start.at) * FULL_PROGRESS / last.progress)
    return elapsed_s * EARLIER_NEXT_TIME


def updated_estimate(previous_s: float | None, sample_s: float) -> float:
    """The learned render time after one more finished render (the first sets it)."""
    if previous_s is None:
        return sample_s
    return previous_s + ESTIMATE_WEIGHT * (sample_s - previous_s)


def _last_change_at(observations: Sequence[Observation]) -> float:
    """When the latest progress value was first seen."""
    latest = observations[-1].progress
    first_seen = observations[-1].at
    for observation in reversed(observations):
        if observation.progress != latest:
            break
        first_seen = observation.at
    return first_seen


def _last_lower(observations: Sequence[Observation], progress: float) -> Observation:
    """Find the latest observation below `progress` (the submit point at worst)."""
    for observation in reversed(observations):
        if observation.progress < progress:
            return observation
    return observations[0]


def retry_delay(
    error: BaseException, attempt: int, *, base_s: float, cap_s: float, rng: RandomSource
) -> float:
    """How long to wait before trying again: the server's Retry-After exactly, else back-off.

    Retry-After is never shortened (a request inside the window is another 429) and never
    jittered upward past it by this function; spacing after the window is the rate limiter's.
    """
    if isinstance(error, NothingCreatedError) and error.retry_after_s is not None:
        return max(error.retry_after_s, 0.0)
    return backoff_delay(attempt, base_s=base_s, cap_s=cap_s, rng=rng)


def render_verdict(job: Job, now: float, deadline_s: float, stall_s: float) -> Verdict | None:
    """Whether a job's render should be given up (see `verdict_at`)."""
    return verdict_at(job.submitted_at, job.last_progress_at, now, deadline_s, stall_s)


def verdict_at(
    submitted_at: float | None,
    last_progress_at: float | None,
    now: float,
    deadline_s: float,
    stall_s: float,
) -> Verdict | None:
    """Whether a render should be given up: the API documents no failure state, so time decides.

    `deadline`: longer than `deadline_s` since submit. `stalled`: no progress change for
    `stall_s` (counted from submit while nothing moved yet).
    """
    if submitted_at is None:
        return None
    if now - submitted_at >= deadline_s:
        return "deadline"
    moved_at = last_progress_at if last_progress_at is not None else submitted_at
    if now - moved_at >= stall_s:
        return "stalled"
    return None
