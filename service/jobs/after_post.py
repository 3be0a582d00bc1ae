"""What to do after a POST: pure decisions for the draft create and the paid export.

The submitter sends a request and hands what came back (`PostOutcome`) to one of these
functions; the decision says which commit to make, and the submitter only makes it. Nothing
here does I/O or reads a clock, so every outcome of every step is a unit test:

| outcome           | after the draft (not billed)     | after the export (billed)           |
|-------------------|----------------------------------|-------------------------------------|
| `Created`         | commit its id, then export       | commit `submitted`, then track      |
| `NothingCreated`  | retry later (Retry-After exact)  | back to `mapped`, retry later       |
| `Unknown` (lost)  | retry later: a lost draft is free| `reconcile`: look, never post blind |
| `Refused`         | fail                             | fail                                |

Both steps share one retry budget (`max_retries`, counted in the job's `attempts`); a job
that used it up fails with `retries_exhausted`, never by a silent stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.backoff import backoff_delay
from service.jobs.ports import ApiError, NothingCreatedError, RefusedError

if TYPE_CHECKING:
    from service.backoff import RandomSource

RETRY_BASE_S = 2.0
RETRY_CAP_S = 300.0


# --- what a POST can tell ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    """The API answered with the project it created (the draft) or exported."""

    project_id: str


@dataclass(frozen=True, slots=True)
class NothingCreated:
    """Certainly nothing was created or billed (a 429, a refused connection): try again.

    `retry_after_s` is the server's Retry-After when it sent one: the retry waits exactly that.
    """

    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The API refused the request (4xx, `success: false`): repeating it will not help."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """No answer that settles it (a lost response, a 5xx, a crash in the call): maybe created."""

    message: str
    code: str = "ambiguous"


PostOutcome = Created | NothingCreated | Refused | Unknown


def outcome_of(error: BaseException) -> PostOutcome:
    """Classify what a POST raised; anything the ports do not vouch for is `Unknown`."""
    if isinstance(error, NothingCreatedError):
        return NothingCreated(error.code, error.message, error.retry_after_s)
    if isinstance(error, RefusedError):
        return Refused(error.code, error.message)
    if isinstance(error, ApiError):
        return Unknown(error.message, error.code)
    return Unknown(f"unexpected error during the request: {error!r}")


# --- what the submitter does next ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proceed:
    """Commit `project_id` and go on: export the draft, or track the export."""

    project_id: str


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Leave (or put back) the job `mapped`, due again at `at` (clock seconds)."""

    at: float
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Fail:
    """End the job as `failed`: nothing more can come of trying."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Reconcile:
    """The paid call may have happened: `reconcile`, where it is looked up, never re-posted."""

    reason: str


DraftDecision = Proceed | RetryAt | Fail
ExportDecision = Proceed | RetryAt | Fail | Reconcile


def retry_at(retry_after_s: float | None, attempt: int, *, now: float, rng: RandomSource) -> float:
    """When a request that created nothing is sent again.

    The server's Retry-After exactly when it sent one (never shortened: a request inside the
    window is another 429), else capped exponential back-off with full jitter.
    """
    if retry_after_s is not None:
        return now + max(retry_after_s, 0.0)
    return now + backoff_delay(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S, rng=rng)


def after_draft(
    outcome: PostOutcome, *, attempts: int, max_retries: int, now: float, rng: RandomSource
) -> DraftDecision:
    """Step one of the two-step flow; `attempts` counts the tries made before this one.

    Nothing is billed whatever happened, so a lost response is tried again like a 429 (from a
    new draft: the lost one is left unused). A refusal fails the job at once.
    """
    if isinstance(outcome, Created):
        return Proceed(outcome.project_id)
    if isinstance(outcome, Refused):
        return Fail(outcome.code, outcome.message)
    failures = attempts + 1
    if failures >= max_retries:
        return Fail(
            "retries_exhausted",
            f"gave up creating the draft after {failures} tries: {outcome.message}",
        )
    if isinstance(outcome, NothingCreated):
        at = retry_at(outcome.retry_after_s, failures, now=now, rng=rng)
        return RetryAt(at, outcome.code, outcome.message)
    return RetryAt(retry_at(None, failures, now=now, rng=rng), outcome.code, outcome.message)


def after_export(
    outcome: PostOutcome, *, attempts: int, max_retries: int, now: float, rng: RandomSource
) -> ExportDecision:
    """The paid call; `attempts` already counts this one (committed with `submitting`).

    Only certainty sends the job back to `mapped`: an answer that nothing was created. An
    outcome that is not known goes to `reconcile`, whatever the retry budget says.
    """
    if isinstance(outcome, Created):
        return Proceed(outcome.project_id)
    if isinstance(outcome, Unknown):
        return Reconcile(outcome.message)
    if isinstance(outcome, Refused):
        return Fail(outcome.code, outcome.message)
    if attempts >= max_retries:
        return Fail("retries_exhausted", f"gave up after {attempts} attempts: {outcome.message}")
    at = retry_at(outcome.retry_after_s, attempts, now=now, rng=rng)
    return RetryAt(at, outcome.code, outcome.message)
