"""What each console page shows, read from the store: one async function per page.

Each returns the context its template renders. Only store reads and the configuration are
used here; formatting rules live in `present.py`, HTTP in `server.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from service.admin import ReadinessCheck
from service.admin_events import redacted_headers
from service.config import Config
from service.console import present
from service.jobs.states import ADMIN_RETRYABLE, IN_FLIGHT
from service.model import EventStatus, Job, JobState
from service.store.base import Store

PAGE_SIZE = 50
READINESS_TTL_S = 5.0
"""Readiness is shared by every open page for this long: the store check is a real commit."""
OVERVIEW_TTL_S = 1.0
"""The overview aggregates over the whole store (tens of ms at 10,000 jobs): every open page
shares one reading per second instead of each making its own."""
HOUR_S = 3600.0
SINCE_CHOICES: Mapping[str, float] = {"1h": HOUR_S, "24h": 24 * HOUR_S, "7d": 7 * 24 * HOUR_S}
VIDEO_STATES = frozenset({JobState.READY, JobState.NOTIFIED})
REPLAYABLE = frozenset({EventStatus.DEAD_LETTERED, EventStatus.IGNORED})
"""Events the page offers to replay: what the configuration could now turn into jobs."""


@dataclass(frozen=True, slots=True)
class JobFilter:
    """The jobs page's query: every field optional, unknown values refused by `parse`."""

    state: JobState | None = None
    route: str | None = None
    source: str | None = None
    since: str | None = None
    after: str | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> JobFilter:
        """Read the query string; ValueError names a value that is not allowed."""
        state = JobState(query["state"]) if query.get("state") else None
        since = query.get("since") or None
        if since is not None and since not in SINCE_CHOICES:
            raise ValueError(f"since must be one of {', '.join(SINCE_CHOICES)}")
        return cls(
            state=state,
            route=query.get("route") or None,
            source=query.get("source") or None,
            since=since,
            after=query.get("after") or None,
        )

    def query(self, **changes: str | None) -> dict[str, str]:
        """The filter as query parameters (empty ones left out), with `changes` applied."""
        values = {
            "state": self.state.value if self.state else None,
            "route": self.route,
            "source": self.source,
            "since": self.since,
            "after": self.after,
        }
        values.update(changes)
        return {k: v for k, v in values.items() if v}


@dataclass
class _Cached:
    value: dict[str, Any] = field(default_factory=dict)
    until: float = 0.0


class ConsoleViews:
    """Reads for every page; shares one readiness result among all open pages."""

    def __init__(
        self,
        *,
        store: Store,
        cfg: Config,
        templates: Mapping[str, Any],
        checks: Mapping[str, ReadinessCheck],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._cfg = cfg
        self._templates = templates
        self._checks = checks
        self._clock = clock
        self._readiness = _Cached()
        self._readiness_lock = anyio.Lock()
        self._overview = _Cached()
        self._overview_lock = anyio.Lock()

    @property
    def store(self) -> Store:
        """The store the pages read (the server acts on it for retries)."""
        return self._store

    async def readiness(self) -> dict[str, str | None]:
        """Each part's problem, or None when it is fine; re-checked at most every 5 s."""
        async with self._readiness_lock:
            now = time.monotonic()
            if now >= self._readiness.until:
                results: dict[str, str | None] = {}
                for name, check in self._checks.items():
                    results[name] = await check()
                self._readiness = _Cached(results, now + READINESS_TTL_S)
            return dict(self._readiness.value)

    async def overview(self) -> dict[str, Any]:
        """Health, work in flight, the last hour's activity, spend and what needs a look."""
        async with self._overview_lock:
            now = time.monotonic()
            if now >= self._overview.until:
                self._overview = _Cached(await self._read_overview(), now + OVERVIEW_TTL_S)
            return dict(self._overview.value)

    async def _read_overview(self) -> dict[str, Any]:
        now = self._clock()
        store = self._store
        states = await store.count_jobs_by_state()
        today = await store.exports_by_route(present.start_of_day(now))
        month = await store.exports_by_route(present.start_of_month(now))
        activity = await store.activity_per_minute(now - HOUR_S)
        return {
            "readiness": await self.readiness(),
            "in_flight": sum(states.get(s, 0) for s in IN_FLIGHT),
            "budget": self._cfg.aistudios.max_concurrent_exports,
            "states": [(s, states.get(s, 0)) for s in JobState],
            "counts": {s.value: states.get(s, 0) for s in JobState},
            "billed": [
                (route, today.get(route, 0), month.get(route, 0))
                for route in sorted(set(month) | {r.name for r in self._cfg.routes})
            ],
            "billed_today": sum(today.values()),
            "billed_month": sum(month.values()),
            "outbox": await store.count_outbox_by_status(),
            "events": await store.count_events_by_status(),
            "chart": present.activity_chart(activity, now),
            "simulator": self._cfg.aistudios.uses_simulator,
            "now": now,
        }

    async def jobs(self, jobs_filter: JobFilter) -> dict[str, Any]:
        """One page of jobs with each one's age and ETA."""
        now = self._clock()
        since = SINCE_CHOICES.get(jobs_filter.since or "")
        jobs = await self._store.list_jobs(
            state=jobs_filter.state,
            route=jobs_filter.route,
            source=jobs_filter.source,
            created_since=now - since if since is not None else None,
            limit=PAGE_SIZE,
            after=jobs_filter.after,
        )
        return {
            "rows": [self._job_row(job, now) for job in jobs],
            "filter": jobs_filter,
            "older": jobs_filter.query(after=jobs[-1].job_id) if len(jobs) == PAGE_SIZE else None,
            "states": list(JobState),
            "routes": [r.name for r in self._cfg.routes],
            "sources": [s.name for s in self._cfg.sources],
            "since_choices": list(SINCE_CHOICES),
        }

    def _job_row(self, job: Job, now: float) -> dict[str, Any]:
        done = job.state in VIDEO_STATES
        return {
            "job": job,
            "progress": present.FULL_PROGRESS if done else job.progress,
            "live": job.state in IN_FLIGHT or job.state in {JobState.RECEIVED, JobState.MAPPED},
            "age": present.duration(now - job.created_at),
            "eta": present.duration(eta) if (eta := present.eta_seconds(job, now)) else None,
        }

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """Everything about one job, or None when there is no such job."""
        job = await self._store.get_job(job_id)
        if job is None:
            return None
        now = self._clock()
        event = await self._store.get_event(job.event_row)
        route = next((r for r in self._cfg.routes if r.name == job.route), None)
        template = self._templates.get(route.template) if route is not None else None
        return {
            **self._job_row(job, now),
            "history": await self._store.job_history(job_id),
            "event": event,
            "payload": present.pretty_json(event.body) if event else "",
            "diff": present.export_diff(template, job.export_body),
            "export_json": present.pretty_json(job.export_body),
            "template_name": route.template if route else None,
            "announcements": await self._store.job_announcements(job_id),
            "video_url": self._video_url(job),
            "retryable": job.state in ADMIN_RETRYABLE,
        }

    def _video_url(self, job: Job) -> str | None:
        if job.state not in VIDEO_STATES:
            return None
        if self.local_video(job) is not None:
            return f"/ui/jobs/{job.job_id}/video"
        return job.download_url

    def local_video(self, job: Job) -> Path | None:
        """The kept copy of a job's video, only if it is a file inside the state directory."""
        if not job.video_path:
            return None
        path = Path(job.video_path).resolve()
        if not path.is_relative_to(self._cfg.service.state_dir.resolve()) or not path.is_file():
            return None
        return path

    async def events(
        self, status: EventStatus | None, source: str | None, before: int | None
    ) -> dict[str, Any]:
        """One page of the inbox, newest first; `dead_lettered` are the dead letters."""
        events = await self._store.list_events(
            status=status, source=source, limit=PAGE_SIZE, cursor=before
        )
        query = {"status": status.value if status else None, "source": source}
        older = None
        if len(events) == PAGE_SIZE:
            older = {k: v for k, v in {**query, "before": str(events[-1].id)}.items() if v}
        return {
            "events": events,
            "status_filter": status,
            "source": source,
            "statuses": list(EventStatus),
            "sources": [s.name for s in self._cfg.sources],
            "counts": await self._store.count_events_by_status(),
            "older": older,
        }

    async def event(self, row: int) -> dict[str, Any] | None:
        """One inbox row with its payload, its (redacted) headers and its jobs."""
        event = await self._store.get_event(row)
        if event is None:
            return None
        return {
            "event": event,
            "payload": present.pretty_json(event.body),
            "headers": sorted(redacted_headers(event.headers).items()),
            "replayable": event.status in REPLAYABLE,
            "jobs": await self._store.jobs_of_event(row),
        }

    async def routes(self) -> dict[str, Any]:
        """Each route as configured, with its jobs by state and its failure rate."""
        counts = await self._store.count_jobs_by_route()
        kinds = {s.name: s.kind for s in self._cfg.sources}
        templates = {t.name: t for t in self._cfg.templates}
        rows = []
        for route in self._cfg.routes:
            by_state = counts.get(route.name, {})
            rows.append(
                {
                    "route": route,
                    "source_kind": kinds.get(route.source, "?"),
                    "template": templates.get(route.template),
                    "counts": [(s, n) for s in JobState if (n := by_state.get(s, 0))],
                    "total": sum(by_state.values()),
                    "failure_rate": present.failure_rate(by_state),
                }
            )
        return {"routes": rows}
