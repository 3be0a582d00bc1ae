"""The console's HTTP side: a sub-application mounted at /ui on the service's listener.

Pages are rendered on the server (Jinja2, autoescaped); one small script of our own
(`static/console.js`) swaps in fragments pushed over server-sent events, so progress bars
move and new jobs appear without a reload, and every page still works without it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import jinja2
from aiohttp import web
from markupsafe import escape

from service.admin import ReadinessCheck, RetryRefusedError, retry_failed_job
from service.config import Config
from service.console import present
from service.console.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_TTL_S,
    ConsoleAuth,
    Principal,
)
from service.console.views import ConsoleViews, JobFilter
from service.log import get_logger
from service.model import EventStatus, Replay
from service.store.base import Store, StoreUnavailableError

log = get_logger("console")

PREFIX = "/ui"
LIVE_REFRESH_S = 1.0
HEARTBEAT_S = 15.0
_PRINCIPAL = web.RequestKey("principal", Principal)
_SECURITY_HEADERS = {
    # media-src allows the API's download URL when no local copy of the video is kept.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' http: https:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_STATIC_VERSION = "3"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("service.console", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = present.duration
    env.filters["timestamp"] = present.timestamp
    env.filters["query"] = urlencode
    env.globals["static_version"] = _STATIC_VERSION
    return env


class Console:
    """The operator console; `app()` is what the service mounts at /ui."""

    def __init__(
        self,
        *,
        store: Store,
        cfg: Config,
        templates: Mapping[str, Any],
        checks: Mapping[str, ReadinessCheck],
        on_retry: Callable[[], None],
        replay: Callable[[int], Awaitable[Replay]] | None = None,
        clock: Callable[[], float] = time.time,
        live_refresh_s: float | None = None,
    ) -> None:
        token = cfg.http.admin_token
        self._auth = ConsoleAuth(token, clock) if token else None
        self._views = ConsoleViews(
            store=store, cfg=cfg, templates=templates, checks=checks, clock=clock
        )
        self._on_retry = on_retry
        self._replay = replay
        self._clock = clock
        self._live_refresh_s = LIVE_REFRESH_S if live_refresh_s is None else live_refresh_s
        self._closing = anyio.Event()
        self._env = _environment()

    def app(self) -> web.Application:
        """The sub-application: pages, live fragments, static files, behind the guard."""
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_security_headers)
        app.on_shutdown.append(self._on_shutdown)
        static = Path(str(resources.files("service.console").joinpath("static")))
        app.add_routes(
            [
                web.get("", self.overview, name="root"),
                web.get("/", self.overview),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/jobs", self.jobs),
                web.get("/jobs/{job_id}", self.job),
                web.post("/jobs/{job_id}/retry", self.retry),
                web.get("/jobs/{job_id}/video", self.video),
                web.get("/events", self.events),
                web.get(r"/events/{row:\d+}", self.event),
                web.post(r"/events/{row:\d+}/replay", self.replay),
                web.get("/routes", self.routes),
                web.get("/live/overview", self.live_overview),
                web.get("/live/jobs", self.live_jobs),
                web.get("/live/jobs/{job_id}", self.live_job),
                web.static("/static", static),
            ]
        )
        return app

    @property
    def _authority(self) -> ConsoleAuth:
        if self._auth is None:
            raise RuntimeError("the guard answers every request itself without an admin token")
        return self._auth

    async def _on_shutdown(self, _: web.Application) -> None:
        """End every live stream, so stopping the listener does not wait for open pages."""
        self._closing.set()

    # --- the guard ------------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Static files for anyone; the login form before a session; everything else after."""
        path = request.path.removeprefix(PREFIX)
        if path.startswith("/static/"):
            return await handler(request)
        if self._auth is None:
            return self._render("disabled.html", status=403)
        if path == "/login":
            return await handler(request)
        principal = self._auth.session(request.cookies.get(SESSION_COOKIE)) or self._auth.bearer(
            request.headers.get("Authorization")
        )
        checked = await self._admit(request, path, principal)
        if isinstance(checked, web.StreamResponse):
            return checked
        request[_PRINCIPAL] = checked
        return await handler(request)

    async def _admit(
        self, request: web.Request, path: str, principal: Principal | None
    ) -> Principal | web.StreamResponse:
        """The principal, or the answer when it may not go on (no session, no CSRF token)."""
        if principal is None:
            if request.method == "GET" and not path.startswith("/live/"):
                target = urlencode({"next": request.path_qs})
                return _see_other(f"{PREFIX}/login?{target}")
            return web.Response(status=401, text="log in to the console first")
        if request.method == "POST":
            form = await request.post()
            given = form.get("csrf") or request.headers.get("X-CSRF-Token")
            if not self._authority.csrf_ok(principal, given if isinstance(given, str) else None):
                log.warning("console.csrf_refused", path=request.path, via=principal.via)
                return web.Response(status=403, text="missing or wrong CSRF token")
        return principal

    def _render(
        self, name: str, *, status: int = 200, request: web.Request | None = None, **context: object
    ) -> web.Response:
        principal = request.get(_PRINCIPAL) if request is not None else None
        if principal is not None and self._auth is not None:
            context.setdefault("csrf", self._auth.csrf_token(principal))
        context.setdefault("csrf", "")
        context.setdefault("signed_in", principal is not None and principal.via == "session")
        context.setdefault("active", "")
        html = self._env.get_template(name).render(prefix=PREFIX, **context)
        return web.Response(text=html, status=status, content_type="text/html")

    def _fragment(self, name: str, **context: object) -> str:
        return self._env.get_template(name).render(prefix=PREFIX, **context)

    # --- login ----------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        """The form, with a pre-login cookie its CSRF token is bound to."""
        return self._login_page(request, error=None, status=200)

    def _login_page(self, request: web.Request, *, error: str | None, status: int) -> web.Response:
        auth = self._authority
        nonce = ConsoleAuth.new_login_nonce()
        next_path = _safe_next(request.query.get("next"))
        response = self._render(
            "login.html",
            status=status,
            login_csrf=auth.login_csrf_token(nonce),
            next_path=next_path,
            error=error,
        )
        response.set_cookie(LOGIN_COOKIE, nonce, **_cookie_flags(request, max_age=3600))
        return response

    async def login(self, request: web.Request) -> web.Response:
        """Check the admin token; on success set the session cookie and go where asked."""
        auth = self._authority
        form = await request.post()
        given_csrf = form.get("csrf")
        if not auth.login_csrf_ok(
            request.cookies.get(LOGIN_COOKIE), given_csrf if isinstance(given_csrf, str) else None
        ):
            log.warning("console.login_refused", reason="csrf", remote=request.remote)
            return self._login_page(request, error="The form expired: try again.", status=403)
        token = form.get("token")
        if not isinstance(token, str) or not auth.token_matches(token):
            log.warning("console.login_refused", reason="token", remote=request.remote)
            return self._login_page(request, error="Wrong admin token.", status=401)
        cookie, _ = auth.new_session()
        next_path = form.get("next")
        response = _see_other(_safe_next(next_path if isinstance(next_path, str) else None))
        response.set_cookie(SESSION_COOKIE, cookie, **_cookie_flags(request, max_age=SESSION_TTL_S))
        response.del_cookie(LOGIN_COOKIE, path=PREFIX)
        log.info("console.login", remote=request.remote)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """Forget the session cookie (the guard checked the CSRF token)."""
        response = _see_other(f"{PREFIX}/login")
        response.del_cookie(SESSION_COOKIE, path=PREFIX)
        _ = request
        return response

    # --- pages ----------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """Health, work in flight, activity, spend."""
        data = await self._views.overview()
        return self._render("overview.html", request=request, active="overview", **data)

    async def jobs(self, request: web.Request) -> web.Response:
        """The jobs list with filters; its rows are live."""
        try:
            jobs_filter = JobFilter.parse(request.query)
        except ValueError as exc:
            return web.Response(status=400, text=f"bad filter: {exc}")
        data = await self._views.jobs(jobs_filter)
        live = f"{PREFIX}/live/jobs?{urlencode(jobs_filter.query())}"
        return self._render("jobs.html", request=request, active="jobs", live_url=live, **data)

    async def job(self, request: web.Request) -> web.Response:
        """One job in full."""
        data = await self._views.job(request.match_info["job_id"])
        if data is None:
            return self._render("missing.html", request=request, status=404, what="job")
        notice = {"retried": "Retry accepted: the job is mapped again from its event."}.get(
            request.query.get("done", "")
        )
        return self._render(
            "job.html", request=request, active="jobs", notice=notice, error=None, **data
        )

    async def retry(self, request: web.Request) -> web.Response:
        """The Retry button: a new, paid export of a failed or rejected job."""
        job_id = request.match_info["job_id"]
        job = await self._views.store.get_job(job_id)
        if job is None:
            return self._render("missing.html", request=request, status=404, what="job")
        try:
            await retry_failed_job(self._views.store, job)
        except RetryRefusedError as exc:
            data = await self._views.job(job_id) or {}
            return self._render(
                "job.html", request=request, status=409, notice=None, error=str(exc), **data
            )
        self._on_retry()
        return _see_other(f"{PREFIX}/jobs/{job_id}?done=retried")

    async def video(self, request: web.Request) -> web.StreamResponse:
        """The kept copy of a job's video (range requests work, so the player can seek)."""
        job = await self._views.store.get_job(request.match_info["job_id"])
        path = self._views.local_video(job) if job is not None else None
        if path is None:
            return web.Response(status=404, text="no local copy of this video")
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})

    async def events(self, request: web.Request) -> web.Response:
        """The inbox, newest first; `dead_lettered` events are the dead letters."""
        query = request.query
        try:
            status = EventStatus(query["status"]) if query.get("status") else None
            before = int(query["before"]) if query.get("before") else None
        except ValueError as exc:
            return web.Response(status=400, text=f"bad filter: {exc}")
        data = await self._views.events(status, query.get("source") or None, before)
        return self._render("events.html", request=request, active="events", **data)

    async def event(self, request: web.Request) -> web.Response:
        """One inbox row."""
        data = await self._views.event(int(request.match_info["row"]))
        if data is None:
            return self._render("missing.html", request=request, status=404, what="event")
        replayed = request.query.get("replayed", "")
        notice = None
        if replayed.isdigit():
            notice = f"Replayed through the current configuration: {replayed} new job(s)."
        return self._render(
            "event.html",
            request=request,
            active="events",
            notice=notice,
            can_replay=self._replay is not None,
            **data,
        )

    async def replay(self, request: web.Request) -> web.Response:
        """The Replay button: the stored event through the current configuration.

        The same replay as `POST /events/{id}/replay` without `rerender`: a route whose job
        exists reports that job and costs nothing.
        """
        row = int(request.match_info["row"])
        if self._replay is None:
            return web.Response(status=404, text="replay is not available here")
        try:
            result = await self._replay(row)
        except LookupError:
            return self._render("missing.html", request=request, status=404, what="event")
        created = sum(1 for job in result.jobs if job.created)
        log.info("console.replay", row=row, created=created, status=str(result.event.status))
        target = result.duplicate_of if result.duplicate_of is not None else row
        return _see_other(f"{PREFIX}/events/{target}?{urlencode({'replayed': created})}")

    async def routes(self, request: web.Request) -> web.Response:
        """Each route's configuration, counts and failure rate."""
        data = await self._views.routes()
        return self._render("routes.html", request=request, active="routes", **data)

    # --- live fragments -------------------------------------------------------------------

    async def live_overview(self, request: web.Request) -> web.StreamResponse:
        """The overview's figures, pushed when they change."""

        async def render() -> str:
            return self._fragment("_overview.html", **await self._views.overview())

        return await self._stream(request, render)

    async def live_jobs(self, request: web.Request) -> web.StreamResponse:
        """The jobs list's rows for the same filter, pushed when they change."""
        try:
            jobs_filter = JobFilter.parse(request.query)
        except ValueError as exc:
            return web.Response(status=400, text=f"bad filter: {exc}")

        async def render() -> str:
            return self._fragment("_job_rows.html", **await self._views.jobs(jobs_filter))

        return await self._stream(request, render)

    async def live_job(self, request: web.Request) -> web.StreamResponse:
        """One job's state, progress and video, pushed when they change."""
        job_id = request.match_info["job_id"]
        csrf = self._authority.csrf_token(request[_PRINCIPAL])

        async def render() -> str:
            data = await self._views.job(job_id)
            if data is None:
                return "<p>Job is gone.</p>"
            return self._fragment("_job_status.html", csrf=csrf, **data)

        return await self._stream(request, render)

    async def _stream(
        self, request: web.Request, render: Callable[[], Awaitable[str]]
    ) -> web.StreamResponse:
        """Server-sent events: a `fragment` whenever the rendering changes, else a heartbeat.

        The stream ends with the service (shutdown) or with the session that opened it.
        """
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        expires_at = request[_PRINCIPAL].expires_at
        last: str | None = None
        quiet_s = 0.0
        try:
            while not self._closing.is_set():
                if expires_at is not None and self._clock() >= expires_at:
                    break  # the session ended: the page's next reconnect is refused
                try:
                    html = await render()
                except StoreUnavailableError as exc:
                    html = f"<p class='problem'>Store unavailable: {_escape(str(exc))}</p>"
                if html != last:
                    await response.write(_sse("fragment", html))
                    last, quiet_s = html, 0.0
                elif quiet_s >= HEARTBEAT_S:
                    await response.write(b": heartbeat\n\n")
                    quiet_s = 0.0
                with anyio.move_on_after(self._live_refresh_s):
                    await self._closing.wait()
                quiet_s += self._live_refresh_s
        except (ConnectionResetError, ConnectionError):
            pass  # the page was closed: nothing to clean up
        return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith(f"{PREFIX}/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def _see_other(location: str) -> web.Response:
    """303 to `location`: after a form, the browser GETs the next page."""
    return web.Response(status=303, headers={"Location": location})


def _sse(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


def _escape(text: str) -> str:
    return str(escape(text))


def _safe_next(target: str | None) -> str:
    """Only a path inside the console: never an open redirect to another site."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//"):
        return target
    return f"{PREFIX}/"


def _cookie_flags(request: web.Request, *, max_age: float) -> dict[str, Any]:
    return {
        "path": PREFIX,
        "httponly": True,
        "samesite": "Strict",
        "secure": request.secure,
        "max_age": int(max_age),
    }
