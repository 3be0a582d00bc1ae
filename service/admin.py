"""Operations over HTTP: health, readiness, metrics, jobs, and the AI Studios callbacks."""

from __future__ import annotations

import dataclasses
import hmac
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from service.admin_events import EventsApi, ReplayEvent
from service.jobs.retry import retry_update
from service.jobs.states import ADMIN_RETRYABLE
from service.log import get_logger
from service.metrics import Metrics
from service.model import Job, JobState
from service.store.base import StaleTransitionError, Store, StoreUnavailableError

if TYPE_CHECKING:
    from service.config import Problem
    from service.jobs.budget import PeriodReport

log = get_logger("admin")

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when fine, else the reason the service is not ready."""

JOB_ID_PREFIX = "job_"
MIN_SHORT_ID_CHARS = 4
MAX_CANDIDATES = 5
_SHORT_ID = re.compile(rf"[0-9a-f]{{{MIN_SHORT_ID_CHARS},}}")
"""A short job id as `studiohook jobs` shows it: the first hex digits, `job_` optional."""


class BudgetControl(Protocol):
    """The spending caps as operators see and steer them (the daemon's pipeline and config)."""

    async def report(self) -> list[PeriodReport]:
        """Spent and remaining in each current period, globally and per route."""
        ...

    async def release(self) -> list[Problem]:
        """Re-read the caps from the config file and release what they admit; its problems."""
        ...


def budget_view(lines: list[PeriodReport]) -> list[dict[str, Any]]:
    """Period figures as the admin API and the CLI show them (null: no cap)."""
    return [
        {
            "scope": line.scope,
            "period": line.period,
            "limit": line.limit,
            "spent": line.spent,
            "remaining": line.remaining,
        }
        for line in lines
    ]


def _json(data: Any, status: int = 200) -> web.Response:  # noqa: ANN401 - any JSON value
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def job_view(job: Job) -> dict[str, Any]:
    """A job as the admin API shows it: everything but the (large) export body and the token."""
    data = dataclasses.asdict(job)
    data.pop("export_body", None)
    data.pop("callback_token", None)
    data["state"] = job.state.value
    return data


class RetryRefusedError(Exception):
    """The job cannot be retried now; the message says why (its state, or that it moved)."""


async def retry_failed_job(store: Store, job: Job) -> Job:
    """Send a failed or rejected job back to be mapped from its event, under a new export name.

    The one place an operator's retry is decided, for the admin API and the console alike.
    """
    if job.state not in ADMIN_RETRYABLE:
        raise RetryRefusedError(
            f"job is {job.state.value}; only failed or rejected jobs are retried"
        )
    try:
        moved = await store.transition(
            job.job_id, ADMIN_RETRYABLE, JobState.RECEIVED, retry_update(job)
        )
    except StaleTransitionError as exc:
        raise RetryRefusedError("job changed meanwhile; look again") from exc
    log.info("job.retry", job_id=job.job_id)
    return moved


class AdminApi:
    """Routes for operators; the admin token (when set) guards /jobs and /events."""

    def __init__(
        self,
        *,
        store: Store,
        metrics: Metrics,
        checks: dict[str, ReadinessCheck],
        on_callback: Callable[[str, str], Awaitable[bool]],
        on_retry: Callable[[], None],
        admin_token: str | None,
        replay: ReplayEvent | None = None,
        budget: BudgetControl | None = None,
        roles: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self._budget = budget
        self._roles = roles
        self._store = store
        self._metrics = metrics
        self._checks = checks
        self._on_callback = on_callback
        self._on_retry = on_retry
        self._admin_token = admin_token
        self._events = None if replay is None else EventsApi(store, replay, self._authorised)

    def routes(self) -> list[web.RouteDef]:
        """Every admin and callback route."""
        return [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/jobs", self.list_jobs),
            web.get("/jobs/{job_id}", self.show_job),
            web.post("/jobs/{job_id}/retry", self.retry_job),
            web.get("/budget", self.show_budget),
            web.post("/budget/release", self.release_budget),
            web.get("/callbacks/{job_id}/{token}", self.callback),
            web.post("/callbacks/{job_id}/{token}", self.callback),
            *(self._events.routes() if self._events is not None else ()),
        ]

    async def healthz(self, _: web.Request) -> web.Response:
        """The process answers: nothing more (restart it when this fails)."""
        return _json({"status": "alive"})

    async def readyz(self, _: web.Request) -> web.Response:
        """Store writable, broker connected, API reachable: else 503 with the reasons.

        `roles` says what this instance does among several (`mqtt`: `reader` or `standby`).
        """
        problems: dict[str, str] = {}
        for name, check in self._checks.items():
            reason = await check()
            if reason is not None:
                problems[name] = reason
        body: dict[str, object] = {"status": "not ready" if problems else "ready"}
        if problems:
            body["problems"] = problems
        roles = dict(self._roles()) if self._roles is not None else {}
        if roles:
            body["roles"] = roles
        return _json(body, status=503 if problems else 200)

    async def metrics(self, _: web.Request) -> web.Response:
        """Prometheus exposition; store-derived gauges are read at scrape time."""
        try:
            self._metrics.set_job_counts(await self._store.count_jobs_by_state())
            self._metrics.outbox_backlog.set(await self._store.outbox_backlog())
            if self._budget is not None:
                self._metrics.set_budget(await self._budget.report())
        except StoreUnavailableError:
            log.warning("metrics.store_unavailable")
        return web.Response(body=self._metrics.render(), content_type="text/plain")

    def _authorised(self, request: web.Request) -> bool:
        if not self._admin_token:
            return True
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self._admin_token.encode())

    async def _job_or_error(self, request: web.Request) -> Job | web.Response:
        """The job the URL names, or the 401/404 answer to send instead."""
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        job_id = request.match_info["job_id"]
        job = await self._store.get_job(job_id)
        if job is not None:
            return job
        prefix = job_id if job_id.startswith(JOB_ID_PREFIX) else JOB_ID_PREFIX + job_id
        if _SHORT_ID.fullmatch(prefix.removeprefix(JOB_ID_PREFIX)):
            matches = await self._store.job_ids_with_prefix(prefix, limit=MAX_CANDIDATES + 1)
            if len(matches) > 1:
                listed = ", ".join(matches[:MAX_CANDIDATES])
                more = ", …" if len(matches) > MAX_CANDIDATES else ""
                return _json(
                    {
                        "error": f"job id {job_id} is ambiguous: {listed}{more}",
                        "candidates": matches[:MAX_CANDIDATES],
                    },
                    status=400,
                )
            if matches and (job := await self._store.get_job(matches[0])) is not None:
                return job
        return _json({"error": f"no job {job_id}"}, status=404)

    async def list_jobs(self, request: web.Request) -> web.Response:
        """`GET /jobs?state=&route=&limit=&after=`: newest first, `next` for the next page."""
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        query = request.query
        try:
            state = JobState(query["state"]) if "state" in query else None
            limit = max(1, min(500, int(query.get("limit", "50"))))
        except ValueError as exc:
            return _json({"error": f"bad query: {exc}"}, status=400)
        jobs = await self._store.list_jobs(
            state=state, route=query.get("route"), limit=limit, after=query.get("after")
        )
        next_after = jobs[-1].job_id if len(jobs) == limit else None
        return _json({"jobs": [job_view(j) for j in jobs], "next": next_after})

    async def show_job(self, request: web.Request) -> web.Response:
        """One job with its history of transitions (a unique id prefix names it too)."""
        job = await self._job_or_error(request)
        if isinstance(job, web.Response):
            return job
        history = [
            {
                "from": t.from_state.value if t.from_state else None,
                "to": t.to_state.value,
                "at": t.at,
                "note": t.note,
            }
            for t in await self._store.job_history(job.job_id)
        ]
        return _json({**job_view(job), "history": history})

    async def retry_job(self, request: web.Request) -> web.Response:
        """Replay a failed or rejected job from its stored event (a new, paid export)."""
        job = await self._job_or_error(request)
        if isinstance(job, web.Response):
            return job
        try:
            job = await retry_failed_job(self._store, job)
        except RetryRefusedError as exc:
            return _json({"error": str(exc)}, status=409)
        self._on_retry()
        return _json(job_view(job), status=202)

    async def show_budget(self, request: web.Request) -> web.Response:
        """`GET /budget`: billed exports and room left per period, globally and per route."""
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        if self._budget is None:
            return _json({"error": "no budget in this service"}, status=404)
        held = await self._store.count_jobs_by_state()
        lines = budget_view(await self._budget.report())
        return _json({"periods": lines, "held": held.get(JobState.HELD, 0)})

    async def release_budget(self, request: web.Request) -> web.Response:
        """`POST /budget/release`: re-read the caps from the config file, release what fits.

        A raised cap takes effect without a restart; a config with problems changes nothing
        and answers 422 with them.
        """
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        if self._budget is None:
            return _json({"error": "no budget in this service"}, status=404)
        problems = await self._budget.release()
        if problems:
            return _json(
                {"error": "config has problems", "problems": [str(p) for p in problems]}, 422
            )
        log.info("budget.release_requested")
        return _json({"periods": budget_view(await self._budget.report())}, status=202)

    async def callback(self, request: web.Request) -> web.Response:
        """AI Studios completion callback: only wakes a confirming poll, never trusted itself."""
        job_id = request.match_info["job_id"]
        if not await self._on_callback(job_id, request.match_info["token"]):
            return _json({"error": "unknown callback"}, status=404)
        return _json({"ok": True})
