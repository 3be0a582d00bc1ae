"""The spending caps as pure decisions: which caps apply now, which held jobs may go.

Periods are UTC calendar days and months. The store counts the billed exports (one record per
paid call committed, taken back when the call certainly created nothing) and decides "spend or
hold" in the same transaction that commits `submitting`, against the caps computed here; the
release loop asks `releasable` which `held` jobs the room left in each period admits, oldest
first. Nothing here reads a clock or does I/O: `now` is always a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from service.model import Job, SpendCap


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """The configured caps (None: no cap); `route_per_day` holds each route's daily cap."""

    exports_per_day: int | None = None
    exports_per_month: int | None = None
    route_per_day: Mapping[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether any cap is set at all."""
        return (
            self.exports_per_day is not None
            or self.exports_per_month is not None
            or bool(self.route_per_day)
        )


@dataclass(frozen=True, slots=True)
class Spent:
    """Billed exports counted in the current periods: all routes, and per route today."""

    day: int = 0
    month: int = 0
    route_day: Mapping[str, int] = field(default_factory=dict)


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def day_start(now: float) -> float:
    """The start (UTC midnight) of the day `now` is in, in epoch seconds."""
    moment = _utc(now)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def month_start(now: float) -> float:
    """The start of the UTC month `now` is in, in epoch seconds."""
    moment = _utc(now)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def next_rollover(now: float) -> float:
    """When the next period starts: the next UTC midnight (a month always starts at one)."""
    start = datetime.fromtimestamp(day_start(now), UTC)
    return (start + timedelta(days=1)).timestamp()


def day_name(now: float) -> str:
    """The UTC day `now` is in, as `2026-12-01`."""
    return _utc(now).strftime("%Y-%m-%d")


def month_name(now: float) -> str:
    """The UTC month `now` is in, as `2026-12`."""
    return _utc(now).strftime("%Y-%m")


def caps_for(limits: BudgetLimits, route: str, now: float) -> tuple[SpendCap, ...]:
    """Every cap a paid call of `route` at `now` must stay under, narrowest period first."""
    caps: list[SpendCap] = []
    route_cap = limits.route_per_day.get(route)
    if route_cap is not None:
        caps.append(
            SpendCap(f"route:{route}:day:{day_name(now)}", day_start(now), route_cap, route)
        )
    if limits.exports_per_day is not None:
        caps.append(SpendCap(f"day:{day_name(now)}", day_start(now), limits.exports_per_day))
    if limits.exports_per_month is not None:
        caps.append(
            SpendCap(f"month:{month_name(now)}", month_start(now), limits.exports_per_month)
        )
    return tuple(caps)


def remaining(limit: int | None, spent: int) -> int | None:
    """Room left under a cap; None when there is no cap."""
    return None if limit is None else max(0, limit - spent)


def releasable(held: Sequence[Job], limits: BudgetLimits, spent: Spent) -> list[str]:
    """The held jobs (given oldest first) that the room left admits, in that order.

    Each admitted job takes one unit of room from every cap it falls under, so a release never
    admits more than the caps allow. A job whose route cap is full is skipped without blocking
    other routes' jobs behind it; when a global cap is full nothing more goes.
    """
    day = remaining(limits.exports_per_day, spent.day)
    month = remaining(limits.exports_per_month, spent.month)
    routes = {
        route: limit - spent.route_day.get(route, 0)
        for route, limit in limits.route_per_day.items()
    }
    chosen: list[str] = []
    for job in held:
        if day == 0 or month == 0:
            break
        if routes.get(job.route, 1) <= 0:
            continue
        chosen.append(job.job_id)
        day = None if day is None else day - 1
        month = None if month is None else month - 1
        if job.route in routes:
            routes[job.route] -= 1
    return chosen


@dataclass(frozen=True, slots=True)
class PeriodReport:
    """Spent and remaining in one period, for the CLI and /metrics."""

    scope: str
    period: str
    limit: int | None
    spent: int

    @property
    def remaining(self) -> int | None:
        """Room left; None without a cap."""
        return remaining(self.limit, self.spent)


def report(
    limits: BudgetLimits, spent: Spent, routes: Sequence[str], now: float
) -> list[PeriodReport]:
    """Every period's figures: global day and month, then each route's day."""
    lines = [
        PeriodReport("day", day_name(now), limits.exports_per_day, spent.day),
        PeriodReport("month", month_name(now), limits.exports_per_month, spent.month),
    ]
    lines += [
        PeriodReport(
            f"route:{route}",
            day_name(now),
            limits.route_per_day.get(route),
            spent.route_day.get(route, 0),
        )
        for route in routes
    ]
    return lines
