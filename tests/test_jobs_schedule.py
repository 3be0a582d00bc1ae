import random

import pytest

from service.aistudios.errors import PermanentError, RetryableError
from service.backoff import backoff_delay
from service.jobs.schedule import (
    Observation,
    next_poll_delay,
    render_time_sample,
    render_verdict,
    retry_delay,
    updated_estimate,
)
from service.model import Job, JobState

FIRST_GUESS_S = 5.0  # the configured default first_poll_seconds


def linear_render(duration_s):
    def progress_at(t):
        return min(100.0, round(100.0 * t / duration_s, 2))

    return progress_at


def count_polls(progress_at, *, floor_s, ceiling_s, limit=100):
    """Drive the schedule with a simulated clock; return (polls, finish seen at)."""
    now = 0.0
    observations = [Observation(0.0, 0.0)]
    for polls in range(1, limit + 1):
        now += next_poll_delay(
            observations, now, floor_s=floor_s, ceiling_s=ceiling_s, first_guess_s=FIRST_GUESS_S
        )
        progress = progress_at(now)
        if progress >= 100.0:
            return polls, now
        observations.append(Observation(now, progress))
    raise AssertionError("never finished")


@pytest.mark.parametrize("duration_s", [10.0, 60.0, 300.0])
def test_linear_renders_cost_a_handful_of_polls(duration_s):
    polls, seen_at = count_polls(linear_render(duration_s), floor_s=2.0, ceiling_s=60.0)
    assert polls <= 6
    # ...and the finish is noticed soon after it happened, not a ceiling later.
    assert seen_at - duration_s < max(0.1 * duration_s, 2.0)


def test_fast_renders_scale_down_with_the_floor():
    polls, seen_at = count_polls(linear_render(0.4), floor_s=0.05, ceiling_s=0.5)
    assert polls <= 4
    assert seen_at < 0.6


def test_a_render_queued_before_starting_backs_off_geometrically():
    def queued_then_linear(t):
        return 0.0 if t < 100 else min(100.0, (t - 100) * 2.0)

    polls, seen_at = count_polls(queued_then_linear, floor_s=2.0, ceiling_s=60.0)
    assert polls <= 8
    assert seen_at < 160


def test_delay_stays_within_floor_and_ceiling():
    observations = [Observation(0.0, 0.0), Observation(1.0, 99.9)]
    assert (
        next_poll_delay(observations, 1.0, floor_s=3.0, ceiling_s=60.0, first_guess_s=FIRST_GUESS_S)
        == 3.0
    )
    slow = [Observation(0.0, 0.0), Observation(10.0, 0.1)]
    assert (
        next_poll_delay(slow, 10.0, floor_s=3.0, ceiling_s=60.0, first_guess_s=FIRST_GUESS_S)
        == 60.0
    )
    assert next_poll_delay([], 0.0, floor_s=1.0, ceiling_s=2.0, first_guess_s=FIRST_GUESS_S) == 2.0


def test_a_stuck_render_is_polled_less_and_less_often():
    observations = [Observation(0.0, 0.0), Observation(5.0, 50.0), Observation(11.0, 50.0)]
    first = next_poll_delay(
        observations, 11.0, floor_s=1.0, ceiling_s=600.0, first_guess_s=FIRST_GUESS_S
    )
    observations.append(Observation(11.0 + first, 50.0))
    second = next_poll_delay(
        observations, 11.0 + first, floor_s=1.0, ceiling_s=600.0, first_guess_s=FIRST_GUESS_S
    )
    assert first >= 6.0
    assert second > first


def test_backoff_uses_full_jitter_below_an_exponential_cap():
    rng = random.Random(7)  # noqa: S311 - jitter, not cryptography
    for attempt in range(1, 12):
        bound = min(30.0, 0.5 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, base_s=0.5, cap_s=30.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= s < bound for s in samples)
        # Full jitter spreads over the whole range, not just near the bound.
        assert min(samples) < 0.2 * bound
        assert max(samples) > 0.8 * bound


def test_backoff_survives_huge_attempt_numbers():
    rng = random.Random(1)  # noqa: S311 - jitter, not cryptography
    assert 0.0 <= backoff_delay(10_000, base_s=1.0, cap_s=5.0, rng=rng) < 5.0


def test_retry_after_is_honoured_exactly():
    error = RetryableError("throttled", status=429, retry_after_s=7.25)
    for attempt in (1, 5, 50):
        assert retry_delay(error, attempt, base_s=1.0, cap_s=2.0, rng=random.Random()) == 7.25  # noqa: S311 - unused


def test_without_retry_after_the_backoff_applies():
    class Fixed:
        def random(self):
            return 0.5

    error = RetryableError("connection refused")
    assert retry_delay(error, 3, base_s=1.0, cap_s=60.0, rng=Fixed()) == 2.0
    assert retry_delay(PermanentError("no"), 1, base_s=1.0, cap_s=60.0, rng=Fixed()) == 0.5


def make_job(**fields):
    base = {
        "job_id": "job_1",
        "event_row": 1,
        "source": "s",
        "route": "r",
        "state": JobState.SUBMITTED,
        "export_name": "n",
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    return Job(**(base | fields))


def test_render_verdict_deadline_and_stall():
    job = make_job(submitted_at=100.0, last_progress_at=150.0)
    assert render_verdict(job, 200.0, deadline_s=1000.0, stall_s=60.0) is None
    assert render_verdict(job, 210.0, deadline_s=1000.0, stall_s=60.0) == "stalled"
    assert render_verdict(job, 1100.0, deadline_s=1000.0, stall_s=60.0) == "deadline"


def test_a_render_that_never_moved_stalls_from_its_submit_time():
    job = make_job(submitted_at=100.0)
    assert render_verdict(job, 159.0, deadline_s=1000.0, stall_s=60.0) is None
    assert render_verdict(job, 160.0, deadline_s=1000.0, stall_s=60.0) == "stalled"
    assert render_verdict(make_job(), 1e9, deadline_s=1.0, stall_s=1.0) is None


def test_a_render_seen_half_done_is_sampled_at_its_full_length():
    observations = [Observation(100.0, 0.0), Observation(101.0, 50.0), Observation(102.1, 100.0)]
    assert render_time_sample(observations, 102.1) == pytest.approx(2.0)


def first_poll_of_a_2s_render(first_poll_s):
    """The readings of a 2 s linear render whose first poll comes at `first_poll_s`."""
    start = Observation(0.0, 0.0)
    if first_poll_s >= 2.0:
        return [start, Observation(first_poll_s, 100.0)], first_poll_s
    partial = Observation(first_poll_s, 100.0 * first_poll_s / 2.0)
    return [start, partial, Observation(2.1, 100.0)], 2.1


def test_a_render_done_at_its_first_poll_is_sampled_earlier_so_estimates_never_creep_up():
    observations = [Observation(100.0, 0.0), Observation(103.0, 100.0)]
    assert render_time_sample(observations, 103.0) == pytest.approx(2.4)
    estimate = 6.0  # a first guess far too late
    for _ in range(30):
        observations, ready_at = first_poll_of_a_2s_render(estimate)
        estimate = updated_estimate(estimate, render_time_sample(observations, ready_at))
    assert 1.6 <= estimate <= 2.0


def test_the_estimate_moves_a_third_of_the_way_to_each_sample():
    assert updated_estimate(None, 10.0) == 10.0
    assert updated_estimate(10.0, 20.0) == pytest.approx(13.0)
