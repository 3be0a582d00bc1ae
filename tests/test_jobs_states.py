import itertools

from service.jobs.states import ADMIN_RETRYABLE, IN_FLIGHT
from service.model import ALLOWED_TRANSITIONS, JobState

S = JobState
ALLOWED = ALLOWED_TRANSITIONS


def can_transition(from_state, to_state):
    return to_state in ALLOWED[from_state]


def sources_of(to_state):
    return {state for state, targets in ALLOWED.items() if to_state in targets}


def test_happy_path_is_allowed_step_by_step():
    path = [S.RECEIVED, S.MAPPED, S.SUBMITTING, S.SUBMITTED, S.READY, S.NOTIFIED]
    for current, following in itertools.pairwise(path):
        assert can_transition(current, following), (current, following)


def test_no_state_skips_the_submitting_commit():
    # The money rule: nothing reaches `submitted` without passing through `submitting` or
    # `reconcile` (where the export was confirmed to exist).
    assert sources_of(S.SUBMITTED) == {S.SUBMITTING, S.RECONCILE}
    assert not can_transition(S.MAPPED, S.SUBMITTED)


def test_reconcile_resolves_three_ways_and_never_posts_directly():
    assert ALLOWED[S.RECONCILE] == {S.SUBMITTED, S.MAPPED, S.FAILED}
    assert not can_transition(S.RECONCILE, S.SUBMITTING)


def test_terminal_states_only_leave_through_admin_retry_or_a_rerender():
    # notified -> received only: an operator's `events replay --rerender` (a new, paid round).
    assert ALLOWED[S.NOTIFIED] == frozenset({S.RECEIVED})
    assert ALLOWED[S.IGNORED] == frozenset()
    assert can_transition(S.FAILED, S.MAPPED)
    assert can_transition(S.REJECTED, S.MAPPED)
    assert not can_transition(S.FAILED, S.SUBMITTING)
    for state in ADMIN_RETRYABLE:
        assert can_transition(state, S.RECEIVED)


def test_rendering_jobs_cannot_be_sent_back_to_mapped():
    assert not can_transition(S.SUBMITTED, S.MAPPED)
    assert not can_transition(S.READY, S.FAILED)


def test_every_state_has_a_row():
    assert set(ALLOWED) == set(JobState)


def test_in_flight_states_are_the_ones_holding_a_render():
    assert {S.SUBMITTING, S.SUBMITTED, S.RECONCILE} == IN_FLIGHT
