"""The spending caps a config file sets, and applying a re-read file to the running pipeline.

Caps are the one money setting an operator changes while the service runs: a month's budget
is raised, a runaway route is capped. SIGHUP and `studiohook budget release` both re-read
`[budget]` and every route's `max_exports_per_day`; a file with problems changes nothing and
the log says why, so a typo never lifts a cap or releases held jobs by accident.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from service.config import Config, ConfigError, Problem, read_config
from service.jobs.budget import BudgetLimits, PeriodReport
from service.jobs.budget import report as budget_report
from service.log import get_logger

if TYPE_CHECKING:
    from service.jobs.pipeline import JobPipeline

log = get_logger("budget")


def budget_limits(cfg: Config) -> BudgetLimits:
    """The spending caps of a config: `[budget]` and each route's `max_exports_per_day`."""
    return BudgetLimits(
        exports_per_day=cfg.budget.exports_per_day,
        exports_per_month=cfg.budget.exports_per_month,
        route_per_day={
            route.name: route.max_exports_per_day
            for route in cfg.routes
            if route.max_exports_per_day is not None
        },
    )


def caps_text(limits: BudgetLimits) -> str:
    """The caps in one line, for the log: `day=5 month=100 route:new-product=2`."""
    parts = [
        f"{period}={'none' if count is None else count}"
        for period, count in (("day", limits.exports_per_day), ("month", limits.exports_per_month))
    ]
    parts += [f"route:{name}={count}" for name, count in sorted(limits.route_per_day.items())]
    return " ".join(parts)


class PipelineBudget:
    """The running caps: reported to the admin API, re-read from the file on request."""

    def __init__(self, pipeline: JobPipeline, cfg: Config) -> None:
        self._pipeline = pipeline
        self._cfg = cfg
        self._reload_wanted = anyio.Event()

    async def report(self) -> list[PeriodReport]:
        """Spent and remaining in each current period, globally and per route."""
        routes = [route.name for route in self._cfg.routes]
        spent = await self._pipeline.spent()
        return budget_report(self._pipeline.budget, spent, routes, time.time())

    async def release(self) -> list[Problem]:
        """Re-read `[budget]` and the routes' caps; apply them unless the file has problems.

        Only the caps change: every other setting still needs a restart. Raised caps release
        held jobs at once, oldest first (the pipeline's budget loop is woken).
        """
        try:
            fresh, problems = await anyio.to_thread.run_sync(read_config, self._cfg.path)
        except ConfigError as exc:
            problems = exc.problems
        kept = caps_text(self._pipeline.budget)
        if problems:
            log.error(
                "budget.reload_refused",
                path=str(self._cfg.path),
                problems="; ".join(str(p) for p in problems),
                kept=kept,
            )
            return list(problems)
        limits = budget_limits(fresh)
        self._pipeline.set_budget(limits)
        log.info("budget.reloaded", path=str(self._cfg.path), caps=caps_text(limits), was=kept)
        return []

    def request_reload(self) -> None:
        """Ask for the caps to be re-read soon (SIGHUP); never blocks the signal handler."""
        self._reload_wanted.set()

    async def follow_reload_requests(self) -> None:
        """Forever: re-read the caps after each `request_reload`."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = anyio.Event()
            await self.release()
