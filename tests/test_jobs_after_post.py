"""After a POST: every outcome of the draft and of the paid export, decided on a fake clock."""

import pytest

from service.jobs.after_post import (
    Created,
    Fail,
    NothingCreated,
    Proceed,
    Reconcile,
    Refused,
    RetryAt,
    Unknown,
    after_draft,
    after_export,
    outcome_of,
)
from service.jobs.ports import ApiError, NothingCreatedError, OutcomeUnknownError, RefusedError
from tests.support.fakes import Pinned

NOW = 5000.0
OK = Created("p1")
THROTTLED = NothingCreated("retryable", "429 too many requests", retry_after_s=7.0)
DOWN = NothingCreated("retryable", "connection refused")
LOST = Unknown("response lost")
REFUSED = Refused("permanent", "bad template")


def draft(outcome, attempts=0, max_retries=5, rng=None):
    rng = rng or Pinned(0.5)
    return after_draft(outcome, attempts=attempts, max_retries=max_retries, now=NOW, rng=rng)


def export(outcome, attempts=1, max_retries=5, rng=None):
    rng = rng or Pinned(0.5)
    return after_export(outcome, attempts=attempts, max_retries=max_retries, now=NOW, rng=rng)


def test_a_created_draft_is_committed_then_exported():
    assert draft(OK) == Proceed("p1")


def test_a_lost_draft_response_is_simply_drafted_again_later():
    decision = draft(LOST)
    assert isinstance(decision, RetryAt)
    assert NOW <= decision.at <= NOW + 2.0
    assert decision.code == "ambiguous"


def test_a_throttled_draft_waits_exactly_the_retry_after():
    assert draft(THROTTLED) == RetryAt(NOW + 7.0, "retryable", "429 too many requests")


def test_a_refused_draft_fails_at_once():
    assert draft(REFUSED) == Fail("permanent", "bad template")


def test_draft_tries_share_the_retry_budget():
    decision = draft(DOWN, attempts=4, max_retries=5)
    assert isinstance(decision, Fail)
    assert decision.code == "retries_exhausted"
    assert "5 tries" in decision.message


def test_an_export_that_answered_is_tracked():
    assert export(OK) == Proceed("p1")


def test_a_lost_export_response_is_looked_up_never_posted_again():
    assert export(LOST) == Reconcile("response lost")
    # Even with the retry budget spent: not knowing is never a reason to fail or to repost.
    assert export(LOST, attempts=99) == Reconcile("response lost")


def test_a_throttled_export_goes_back_to_mapped_after_exactly_the_retry_after():
    assert export(THROTTLED) == RetryAt(NOW + 7.0, "retryable", "429 too many requests")


def test_an_export_that_created_nothing_backs_off_with_jitter():
    low, high = (
        export(DOWN, attempts=3, rng=Pinned(0.0)),
        export(DOWN, attempts=3, rng=Pinned(0.99)),
    )
    assert isinstance(low, RetryAt)
    assert isinstance(high, RetryAt)
    assert low.at == NOW
    assert NOW + 7.0 < high.at < NOW + 8.0  # full jitter under base 2 s * 2**(3-1)


def test_an_export_refused_fails_and_one_past_the_budget_fails_exhausted():
    assert export(REFUSED) == Fail("permanent", "bad template")
    exhausted = export(DOWN, attempts=5, max_retries=5)
    assert isinstance(exhausted, Fail)
    assert exhausted.code == "retries_exhausted"


def test_a_retry_after_is_never_shortened_by_jitter():
    for draw in (0.0, 0.5, 0.999):
        decision = export(THROTTLED, attempts=4, rng=Pinned(draw))
        assert decision == RetryAt(NOW + 7.0, "retryable", "429 too many requests")


def _error(cls, message, **fields):
    error = cls(message)
    error.message = message
    for name, value in fields.items():
        setattr(error, name, value)
    return error


@pytest.mark.parametrize(
    ("error", "outcome_type"),
    [
        (_error(NothingCreatedError, "429", retry_after_s=3.0), NothingCreated),
        (_error(RefusedError, "bad"), Refused),
        (_error(OutcomeUnknownError, "timeout"), Unknown),
        (_error(ApiError, "odd"), Unknown),
        (RuntimeError("bug"), Unknown),
    ],
)
def test_what_a_post_raised_is_classified_and_only_certainty_says_nothing_created(
    error, outcome_type
):
    assert isinstance(outcome_of(error), outcome_type)


def test_the_retry_after_travels_with_the_classified_outcome():
    outcome = outcome_of(_error(NothingCreatedError, "429", retry_after_s=3.0))
    assert outcome == NothingCreated("api_error", "429", 3.0)
