"""What to do after a poll: pure decisions for a render being followed.

The tracker reads a render's progress and hands the reading (or the error) to one of these;
the decision says what to commit and when to poll next, and the tracker only does that. The
API documents no failure state, so time decides when a render is lost: a deadline from submit
and a stall (no progress change) watchdog. No I/O, no clock read: tested on a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.backoff import backoff_delay
from service.jobs.schedule import Observation, Verdict, next_poll_delay, verdict_at

if TYPE_CHECKING:
    from collections.abc import Sequence

    from service.backoff import RandomSource

POLL_RETRY_BASE_S = 2.0
POLL_RETRY_CAP_S = 120.0
VERDICT_EPSILON_S = 0.001
"""A poll scheduled for a verdict lands just after it, so the verdict holds when it runs."""


@dataclass(frozen=True, slots=True)
class PollTiming:
    """The tracker's time budget: poll bounds and when a render counts as lost."""

    floor_s: float
    ceiling_s: float
    deadline_s: float
    stall_s: float
    first_guess_s: float


@dataclass(frozen=True, slots=True)
class RenderSoFar:
    """What is committed of one render: when it was submitted and when its progress last moved."""

    submitted_at: float | None
    progress: float
    last_progress_at: float | None


@dataclass(frozen=True, slots=True)
class Reading:
    """One progress read: 0-100, and whether the API shows the video finished."""

    progress: float
    done: bool


@dataclass(frozen=True, slots=True)
class Finished:
    """Commit `ready` (with its `video.ready` rows); `moved_at` is the progress time to store."""

    moved_at: float | None


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Commit `failed` with this code and message: the render is lost or refused.

    `moved_at` is the progress time to store with the reading that led here, if any.
    """

    code: str
    message: str
    moved_at: float | None = None


@dataclass(frozen=True, slots=True)
class PollAt:
    """Poll again at `at`; `moved_at` is the progress time to store with this reading."""

    at: float
    moved_at: float | None


PollDecision = Finished | GiveUp | PollAt


def verdict_due_at(render: RenderSoFar, timing: PollTiming) -> float:
    """The moment a deadline or stall verdict would fall, so a poll lands right then."""
    if render.submitted_at is None:
        return math.inf
    moved_at = render.last_progress_at
    if moved_at is None:
        moved_at = render.submitted_at
    return min(render.submitted_at + timing.deadline_s, moved_at + timing.stall_s)


def first_poll_at(
    render: RenderSoFar,
    observations: Sequence[Observation],
    *,
    now: float,
    timing: PollTiming,
    first_guess_s: float,
) -> float:
    """When a render newly followed (submitted, adopted or recovered) is first polled.

    From what it already shows, or `first_guess_s` after submit (the template's learned render
    time); never past its verdict.
    """
    delay = next_poll_delay(
        observations,
        now,
        floor_s=timing.floor_s,
        ceiling_s=timing.ceiling_s,
        first_guess_s=first_guess_s,
    )
    return min(now + delay, verdict_due_at(render, timing) + VERDICT_EPSILON_S)


def give_up_message(verdict: Verdict, timing: PollTiming, render: RenderSoFar) -> GiveUp:
    """The failure a verdict commits, saying which limit ran out."""
    if verdict == "deadline":
        message = f"render not finished {timing.deadline_s:g}s after submit"
    else:
        message = f"render made no progress for {timing.stall_s:g}s (at {render.progress:g}%)"
    return GiveUp(verdict, message, render.last_progress_at)


def after_poll(
    reading: Reading,
    render: RenderSoFar,
    observations: Sequence[Observation],
    *,
    now: float,
    timing: PollTiming,
    first_guess_s: float,
) -> PollDecision:
    """What a progress reading means; `observations` already end with this reading.

    Finished: ready. Otherwise a deadline or stall verdict ends it; else the next poll lands
    just after the finish the progress rate predicts (never past the next verdict).
    """
    moved_at = now if reading.progress != render.progress else render.last_progress_at
    if reading.done:
        return Finished(moved_at)
    after = RenderSoFar(render.submitted_at, reading.progress, moved_at)
    verdict = _verdict(after, now, timing.deadline_s, timing.stall_s)
    if verdict is not None:
        return give_up_message(verdict, timing, after)
    delay = next_poll_delay(
        observations,
        now,
        floor_s=timing.floor_s,
        ceiling_s=timing.ceiling_s,
        first_guess_s=first_guess_s,
    )
    return PollAt(min(now + delay, verdict_due_at(after, timing) + VERDICT_EPSILON_S), moved_at)


def after_poll_error(
    *,
    refused: bool,
    retry_after_s: float | None,
    message: str,
    errors: int,
    render: RenderSoFar,
    now: float,
    timing: PollTiming,
    rng: RandomSource,
) -> GiveUp | PollAt:
    """A poll that failed; `errors` counts this one among the render's consecutive failures.

    A read is repeatable, so it is retried (the server's Retry-After exactly, else back-off),
    unless the API refused it outright or the render's deadline has passed anyway.
    """
    if refused:
        return GiveUp("permanent", f"progress check refused: {message}")
    if _verdict(render, now, timing.deadline_s, math.inf) == "deadline":
        return give_up_message("deadline", timing, render)
    if retry_after_s is not None:
        at = now + max(retry_after_s, 0.0)
    else:
        at = now + backoff_delay(errors, base_s=POLL_RETRY_BASE_S, cap_s=POLL_RETRY_CAP_S, rng=rng)
    return PollAt(
        min(at, verdict_due_at(render, timing) + VERDICT_EPSILON_S), render.last_progress_at
    )


def _verdict(render: RenderSoFar, now: float, deadline_s: float, stall_s: float) -> Verdict | None:
    return verdict_at(render.submitted_at, render.last_progress_at, now, deadline_s, stall_s)
