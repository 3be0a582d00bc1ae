"""After a poll: what a progress reading (or a failed read) means, on a fake clock."""

import pytest

from service.jobs.after_poll import (
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
from service.jobs.schedule import Observation

SUBMITTED = 100.0
TIMING = PollTiming(
    floor_s=0.5, ceiling_s=150.0, deadline_s=3600.0, stall_s=600.0, first_guess_s=1.0
)


class Pinned:
    def random(self) -> float:
        return 0.5


def history(*points):
    return [Observation(SUBMITTED, 0.0), *(Observation(at, p) for at, p in points)]


def poll(reading, so_far, observations, now, guess=10.0):
    return after_poll(reading, so_far, observations, now=now, timing=TIMING, first_guess_s=guess)


def test_a_new_render_is_first_polled_at_its_learned_length():
    fresh = RenderSoFar(SUBMITTED, 0.0, None)
    at = first_poll_at(fresh, history(), now=SUBMITTED, timing=TIMING, first_guess_s=2.0)
    assert at == pytest.approx(SUBMITTED + 2.0)


def test_a_recovered_render_is_polled_no_later_than_its_verdict():
    old = RenderSoFar(SUBMITTED, 0.0, None)
    now = SUBMITTED + TIMING.stall_s - 0.2  # the floor alone would land past it
    at = first_poll_at(old, history(), now=now, timing=TIMING, first_guess_s=100.0)
    assert at == pytest.approx(SUBMITTED + TIMING.stall_s + 0.001)


def test_done_is_ready_and_records_when_progress_last_moved():
    so_far = RenderSoFar(SUBMITTED, 40.0, SUBMITTED + 4.0)
    assert poll(Reading(100.0, True), so_far, history((108.0, 100.0)), 108.0) == Finished(108.0)


def test_a_moving_render_is_polled_just_after_its_predicted_finish():
    # 25 % after 5 s: 15 s more; the poll lands a little after 120.
    decision = poll(
        Reading(25.0, False), RenderSoFar(SUBMITTED, 0.0, None), history((105.0, 25.0)), 105.0
    )
    assert isinstance(decision, PollAt)
    assert decision.moved_at == 105.0
    assert 120.0 < decision.at < 121.0


def test_no_move_keeps_the_last_progress_time_and_backs_off():
    so_far = RenderSoFar(SUBMITTED, 25.0, 105.0)
    observations = history((105.0, 25.0), (121.0, 25.0))
    decision = poll(Reading(25.0, False), so_far, observations, 121.0)
    assert isinstance(decision, PollAt)
    assert decision.moved_at == 105.0
    assert decision.at >= 121.0 + 16.0  # waited as long again as nothing has moved


def test_a_render_silent_past_the_stall_time_is_given_up():
    so_far = RenderSoFar(SUBMITTED, 25.0, 105.0)
    now = 105.0 + TIMING.stall_s
    decision = poll(Reading(25.0, False), so_far, history((105.0, 25.0), (now, 25.0)), now)
    assert isinstance(decision, GiveUp)
    assert decision.code == "stalled"
    assert decision.moved_at == 105.0


def test_a_render_past_its_deadline_is_given_up_even_while_moving():
    now = SUBMITTED + TIMING.deadline_s
    so_far = RenderSoFar(SUBMITTED, 98.0, now - 10.0)
    decision = poll(Reading(99.0, False), so_far, history((now - 10.0, 98.0), (now, 99.0)), now)
    assert isinstance(decision, GiveUp)
    assert decision.code == "deadline"


def test_the_next_poll_never_lands_past_the_stall_verdict():
    so_far = RenderSoFar(SUBMITTED, 1.0, 101.0)
    decision = poll(Reading(1.0, False), so_far, history((101.0, 1.0), (650.0, 1.0)), 650.0)
    assert isinstance(decision, PollAt)
    assert decision.at == pytest.approx(101.0 + TIMING.stall_s + 0.001)


def error(now, *, refused=False, retry_after_s=None, errors=1, so_far=None):
    return after_poll_error(
        refused=refused,
        retry_after_s=retry_after_s,
        message="boom",
        errors=errors,
        render=so_far or RenderSoFar(SUBMITTED, 10.0, 104.0),
        now=now,
        timing=TIMING,
        rng=Pinned(),
    )


def test_a_throttled_poll_waits_exactly_the_retry_after():
    assert error(110.0, retry_after_s=4.0) == PollAt(114.0, 104.0)


def test_a_failed_poll_backs_off_with_its_error_count():
    first, third = error(110.0, errors=1), error(110.0, errors=3)
    assert isinstance(first, PollAt)
    assert isinstance(third, PollAt)
    assert first.at == pytest.approx(111.0)
    assert third.at == pytest.approx(114.0)


def test_a_refused_poll_fails_the_render():
    assert error(110.0, refused=True) == GiveUp("permanent", "progress check refused: boom")


def test_a_failed_poll_past_the_deadline_gives_up():
    decision = error(SUBMITTED + TIMING.deadline_s)
    assert isinstance(decision, GiveUp)
    assert decision.code == "deadline"
