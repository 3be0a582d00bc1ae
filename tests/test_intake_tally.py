"""The intake's summary line: counts by outcome, written once per interval, nothing when quiet."""

from __future__ import annotations

from structlog.testing import capture_logs

from service.intake import SUMMARY_EVERY_S, IntakeTally
from tests.support.fakes import FakeClock


def test_one_summary_per_interval_with_the_counts_of_that_interval() -> None:
    clock = FakeClock()
    tally = IntakeTally(clock)
    with capture_logs() as logs:
        tally.count("accepted")
        tally.count("duplicate")
        clock.now += SUMMARY_EVERY_S
        tally.count("accepted")
        tally.count("dead_lettered")
        clock.now += SUMMARY_EVERY_S / 2
        tally.count("accepted")
    summaries = [e for e in logs if e["event"] == "intake summary"]
    assert len(summaries) == 1
    assert summaries[0]["log_level"] == "info"
    assert (summaries[0]["accepted"], summaries[0]["duplicate"]) == (2, 1)
    assert summaries[0]["dead_lettered"] == 0
    assert summaries[0]["seconds"] == SUMMARY_EVERY_S


def test_the_next_interval_starts_from_zero() -> None:
    clock = FakeClock()
    tally = IntakeTally(clock)
    with capture_logs() as logs:
        clock.now += SUMMARY_EVERY_S
        tally.count("accepted")
        tally.count("dead_lettered")
        clock.now += SUMMARY_EVERY_S
        tally.count("duplicate")
    summaries = [e for e in logs if e["event"] == "intake summary"]
    assert [(s["accepted"], s["duplicate"], s["dead_lettered"]) for s in summaries] == [
        (1, 0, 0),
        (0, 1, 1),
    ]
