"""The console's pure rules: durations, ETA, billing periods, diffs, failure rate, the chart."""

from __future__ import annotations

from dataclasses import replace

import orjson

from service.console import present
from service.model import Job, JobState, MinuteActivity

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def job(**changes) -> Job:
    base = Job(
        job_id="job_1",
        event_row=1,
        source="shop",
        route="promo",
        state=JobState.SUBMITTED,
        export_name="promo #job_1",
        created_at=T0,
        updated_at=T0,
        submitted_at=T0,
    )
    return replace(base, **changes)


def test_durations_read_at_a_glance():
    assert present.duration(None) == "—"
    assert present.duration(-3) == "0s"
    assert present.duration(42.9) == "42s"
    assert present.duration(185) == "3m 05s"
    assert present.duration(2 * 3600 + 600) == "2h 10m"
    assert present.duration(4 * 86400 + 3 * 3600) == "4d 3h"


def test_eta_extrapolates_the_progress_rate():
    # 25 % in the first 10 s: 30 s left at that moment, 25 s left 5 s later.
    rendering = job(progress=25.0, last_progress_at=T0 + 10)
    assert present.eta_seconds(rendering, T0 + 10) == 30.0
    assert present.eta_seconds(rendering, T0 + 15) == 25.0
    assert present.eta_seconds(rendering, T0 + 100) == 0.0


def test_no_eta_without_a_rate_or_outside_a_render():
    assert present.eta_seconds(job(), T0 + 5) is None
    assert present.eta_seconds(job(progress=10.0, last_progress_at=T0), T0 + 5) is None
    ready = job(state=JobState.READY, progress=100.0, last_progress_at=T0 + 9)
    assert present.eta_seconds(ready, T0 + 10) is None
    assert present.eta_seconds(job(state=JobState.MAPPED, submitted_at=None), T0) is None


def test_billing_periods_start_at_utc_midnight():
    assert present.start_of_day(T0) == 1_699_920_000.0  # 2023-11-14 00:00 UTC
    assert present.start_of_month(T0) == 1_698_796_800.0  # 2023-11-01 00:00 UTC
    assert present.timestamp(T0) == "2023-11-14 22:13:20 UTC"


def test_payloads_are_shown_as_json_or_as_text():
    assert present.pretty_json(b'{"a":[1]}') == '{\n  "a": [\n    1\n  ]\n}'
    assert present.pretty_json(b"{not json") == "{not json"
    assert present.pretty_json(b"\xff") == "\ufffd"
    assert present.pretty_json(None) == ""


def test_export_diff_shows_the_patched_fields_only():
    template = {"name": "t", "scenes": [{"script": "Hello", "image": "a.png"}]}
    body = {"name": "promo #job_1", "scenes": [{"script": "Meet Mug.", "image": "a.png"}]}
    lines = present.export_diff(template, orjson.dumps(body))
    changed = [(line.kind, " ".join(line.text.split())) for line in lines if line.kind != "same"]
    assert changed == [
        ("hunk", "@@ -1,3 +1,3 @@"),
        ("del", '- "name": "t",'),
        ("add", '+ "name": "promo #job_1",'),
        ("hunk", "@@ -5,3 +5,3 @@"),
        ("del", '- "script": "Hello"'),
        ("add", '+ "script": "Meet Mug."'),
    ]
    assert present.export_diff(template, None) == []
    assert present.export_diff(None, orjson.dumps(body)) == []


def test_failure_rate_counts_outcomes_only():
    assert present.failure_rate({}) is None
    assert present.failure_rate({JobState.SUBMITTED: 4, JobState.IGNORED: 2}) is None
    counts = {JobState.NOTIFIED: 6, JobState.READY: 1, JobState.FAILED: 2, JobState.REJECTED: 1}
    assert present.failure_rate(counts) == 0.3


def test_chart_lays_out_the_last_hour_with_the_current_minute_last():
    now = T0 + 30  # 22:13:50
    current = T0 // 60 * 60
    activity = [
        MinuteActivity(current - 3600, events=9),  # 61 minutes ago: off the chart
        MinuteActivity(current - 59 * 60, events=2, videos=1),
        MinuteActivity(current, events=7, videos=3),
    ]
    chart = present.activity_chart(activity, now)
    assert len(chart.events) == len(chart.videos) == 60
    assert chart.peak == 10
    assert (chart.total_events, chart.total_videos) == (9, 4)
    first, last = chart.events[0], chart.events[-1]
    assert first.label == "21:14 UTC: 2 events"
    assert last.label == "22:13 UTC: 7 events"
    assert last.height == chart.height * 7 / 10
    assert last.y == chart.height - last.height
    assert chart.videos[-1].x > last.x
    assert chart.events[1].height == 0
    empty = present.activity_chart([], now)
    assert empty.peak == 1
    assert all(bar.height == 0 for bar in empty.events)
