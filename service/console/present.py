"""Pure presentation: durations, ETAs, diffs, the activity chart. No I/O, tested without a loop.

The views fetch rows from the store and hand them here; everything a page shows that is
computed rather than read lives in this module, so its rules are unit tests.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from service.model import Job, JobState, MinuteActivity

FULL_PROGRESS = 100.0
_MINUTE_S = 60


def duration(seconds: float | None) -> str:
    """`42s`, `3m 05s`, `2h 10m`, `4d 3h`: short enough for a table cell."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < _MINUTE_S:
        return f"{s}s"
    minutes, s = divmod(s, 60)
    if minutes < 60:  # noqa: PLR2004 - minutes in an hour
        return f"{minutes}m {s:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:  # noqa: PLR2004 - hours in a day
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def timestamp(at: float | None) -> str:
    """UTC wall-clock time to the second, as operators read logs."""
    if at is None:
        return "—"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def eta_seconds(job: Job, now: float) -> float | None:
    """Seconds until the render should be done, from its progress rate; None when unknown.

    The rate is progress over the time from submit to the last change: what the tracker
    itself extrapolates. Not rendering, or no progress seen yet, means no estimate.
    """
    if job.state is not JobState.SUBMITTED or job.submitted_at is None:
        return None
    progress = job.progress
    changed_at = job.last_progress_at
    if progress <= 0 or changed_at is None or changed_at <= job.submitted_at:
        return None
    rate = progress / (changed_at - job.submitted_at)
    finish_at = changed_at + (FULL_PROGRESS - min(progress, FULL_PROGRESS)) / rate
    return max(0.0, finish_at - now)


def start_of_day(now: float) -> float:
    """Midnight UTC of the day `now` is in: "billed today" counts from here."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def start_of_month(now: float) -> float:
    """The first of the month, midnight UTC."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def pretty_json(data: bytes | None) -> str:
    """A payload as indented JSON, or as text when it is not JSON (kept readable, not lost)."""
    if data is None:
        return ""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", errors="replace")
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


@dataclass(frozen=True, slots=True)
class DiffLine:
    """One line of a unified diff, with its kind for styling: add, del, hunk or same."""

    kind: str
    text: str


def export_diff(template: Any, export_body: bytes | None) -> list[DiffLine]:  # noqa: ANN401 - a parsed JSON template
    """The export body against its template, as `studiohook preview` prints it."""
    if export_body is None or template is None:
        return []
    options = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    before = orjson.dumps(template, option=options).decode().splitlines()
    after = orjson.dumps(orjson.loads(export_body), option=options).decode().splitlines()
    lines = []
    for text in difflib.unified_diff(before, after, "template", "export", lineterm="", n=1):
        if text.startswith(("---", "+++")):
            continue
        kind = {"+": "add", "-": "del", "@": "hunk"}.get(text[:1], "same")
        lines.append(DiffLine(kind, text))
    return lines


def failure_rate(counts: Mapping[JobState, int]) -> float | None:
    """Failed or rejected among the jobs that reached an outcome; None before any did."""
    bad = counts.get(JobState.FAILED, 0) + counts.get(JobState.REJECTED, 0)
    good = counts.get(JobState.READY, 0) + counts.get(JobState.NOTIFIED, 0)
    if bad + good == 0:
        return None
    return bad / (bad + good)


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar of the chart, in SVG user units, with its accessible label."""

    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    """Events and videos per minute over the last hour, laid out for an inline SVG."""

    width: int
    height: int
    events: tuple[Bar, ...]
    videos: tuple[Bar, ...]
    peak: int
    total_events: int
    total_videos: int


CHART_WIDTH = 600
CHART_HEIGHT = 120
CHART_MINUTES = 60


def activity_chart(activity: Sequence[MinuteActivity], now: float) -> Chart:
    """Lay out the last 60 minutes (the current one last) as pairs of bars.

    Minutes with nothing are zero-height bars, so the time axis stays even; the scale is the
    busiest minute's count, rounded up to a readable number.
    """
    current = math.floor(now / _MINUTE_S) * _MINUTE_S
    first = current - (CHART_MINUTES - 1) * _MINUTE_S
    by_minute = {m.minute: m for m in activity}
    peak = _nice_ceiling(max([max(m.events, m.videos) for m in activity] or [0]))
    slot = CHART_WIDTH / CHART_MINUTES
    half = slot * 0.42
    events: list[Bar] = []
    videos: list[Bar] = []
    for i in range(CHART_MINUTES):
        minute = first + i * _MINUTE_S
        found = by_minute.get(minute, MinuteActivity(minute))
        when = datetime.fromtimestamp(minute, UTC).strftime("%H:%M")
        x = i * slot + slot * 0.08
        for count, bars, what, offset in (
            (found.events, events, "events", 0.0),
            (found.videos, videos, "videos ready", half),
        ):
            height = CHART_HEIGHT * count / peak
            bars.append(
                Bar(
                    x=round(x + offset, 2),
                    y=round(CHART_HEIGHT - height, 2),
                    width=round(half, 2),
                    height=round(height, 2),
                    label=f"{when} UTC: {count} {what}",
                )
            )
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        events=tuple(events),
        videos=tuple(videos),
        peak=peak,
        total_events=sum(m.events for m in activity if m.minute >= first),
        total_videos=sum(m.videos for m in activity if m.minute >= first),
    )


def _nice_ceiling(value: int) -> int:
    """1, 2, 5, 10, 20, 50, ...: the smallest at or above `value` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10
