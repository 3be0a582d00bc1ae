"""A stand-in for AI Studios: the documented endpoints of both API generations, over HTTP.

`serve` uses it when no credentials are configured and the tests use it instead of the paid
cloud, so it answers exactly as the reference pages in `aistudios-api/` describe and lets a
test (or another process, through `/_simulator/knobs`) inject the failures the real service
may produce: throttling, 5xx, a create whose response is lost, a render that never finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import orjson
from aiohttp import web

from service.aistudios import simulator_v3
from service.log import get_logger

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

_log = get_logger("aistudios.simulator")

V3 = "/api/odin/v3"
LEGACY = "/api/odin"
TOKEN_PATH = f"{V3}/auth/token"
_CALLBACK_CHECK_S = 0.05
_CALLBACK_TIMEOUT_S = 10.0
_DONE = 100.0
_INT_KNOBS = frozenset(
    {
        "fail_5xx_next",
        "throttle_next",
        "lose_response_next_exports",
        "lose_response_next_drafts",
        "failing_renders_next",
    }
)
_FLOAT_KNOBS = frozenset(
    {
        "render_seconds",
        "render_jitter",
        "token_ttl_s",
        "retry_after_s",
        "stall_at",
        "callback_delay_s",
    }
)
_BOOL_KNOBS = frozenset({"list_only_exported", "hold_renders"})
_HELD_AT = 99.0
_CREATES = frozenset(
    {
        ("POST", f"{V3}/editor/project"),
        ("POST", f"{V3}/editor/project/export"),
        ("POST", f"{LEGACY}/editor/project"),
        ("POST", simulator_v3.TEMPLATE_MODIFY_PATH),
        ("POST", simulator_v3.PROJECT_MODIFY_PATH),
    }
)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SimulatorKnobs:
    """What the simulated service does next; tests change these between requests."""

    render_seconds: float = 5.0
    render_jitter: float = 0.0
    """Each render lasts render_seconds times a uniform factor in [1 - jitter, 1 + jitter]."""
    token_ttl_s: float = 24 * 3600
    api_keys: frozenset[str] | None = None
    fail_5xx_next: int = 0
    throttle_next: int = 0
    retry_after_s: float = 1.0
    lose_response_next_exports: int = 0
    """Billed calls (a one-step create, an export of an existing project, a legacy export)
    whose response is dropped after the export started."""
    lose_response_next_drafts: int = 0
    """Unbilled creates (`isExport: false`) whose response is dropped after the draft exists."""
    failing_renders_next: int = 0
    stall_at: float = 40.0
    callback_delay_s: float = 0.0
    app_credentials: dict[str, str] | None = None
    list_only_exported: bool = False
    """The strict reading of the project-list page: only finished exports are listed."""
    hold_renders: bool = False
    """No render finishes while set (progress stops at 99): a test can make "killed before
    any video was ready" a fact instead of a race with render time; clearing it lets every
    render whose time has passed finish at once."""


@dataclass
class SimProject:
    """One project the simulator knows; `rendering` is False for a saved, never-exported one."""

    id: str
    name: str
    scenes: list[Any]
    created_at: float
    api: str
    webhook_url: str | None = None
    render_seconds: float = 0.0
    stall_at: float | None = None
    rendering: bool = True
    orientation: str = "landscape"
    backend_task_id: str | None = None
    """Set when an export starts: a draft has no backend task."""
    exports: int = 0
    """How many exports of this project were billed (a second export is billed again)."""

    def progress_at(self, now: float) -> float:
        """Linear progress over the render time, held at `stall_at` for a failing render."""
        if not self.rendering:
            return 0.0
        elapsed = max(0.0, now - self.created_at)
        progress = (
            _DONE if self.render_seconds <= 0 else min(_DONE, 100 * elapsed / self.render_seconds)
        )
        if self.stall_at is not None:
            progress = min(progress, self.stall_at)
        return round(progress, 2)

    @property
    def credit(self) -> int:
        """A made-up price per scene, so the callback's `credit` is a plausible number."""
        return max(1, len(self.scenes))


class Simulator:
    """The simulated service: one aiohttp app serving v3 and legacy paths on one port."""

    def __init__(
        self, knobs: SimulatorKnobs | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.knobs = knobs or SimulatorKnobs()
        self.clock = clock
        self.base_url = ""
        self.projects: dict[str, SimProject] = {}
        self.saved_projects: dict[str, SimProject] = {}
        self._rng = random.Random(7)  # noqa: S311 - render lengths, not cryptography
        self.export_count = 0
        """Every billed export: one-step creates, exports of existing projects, legacy exports."""
        self.requests: list[tuple[float, str, str]] = []
        self.throttles: list[tuple[float, float]] = []
        """Each 429 answered: when, and the Retry-After it carried (seconds)."""
        self.callbacks: list[tuple[str, dict[str, Any], int | None]] = []
        self.server_templates: dict[str, dict[str, Any]] = {}
        self.saved_v3_projects: dict[str, SimProject] = {}
        self.modify_requests: list[dict[str, Any]] = []
        self._tokens: dict[str, float] = {}
        self._video = (
            resources.files("service.aistudios").joinpath("assets/sample.mp4").read_bytes()
        )
        self._runner: web.AppRunner | None = None
        self._tasks: TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.app = self._build_app()
        self.save_project("sample-project", "Sample project", [_sample_legacy_scene()])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind, start the callback sender, and return the base URL clients should use."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_CALLBACK_TIMEOUT_S))
        ready = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(ready), name="simulator-callbacks")
        await ready.wait()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving and cancel pending callbacks."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def billed_exports(self, project_id: str) -> int:
        """How many times one project was billed: more than one means it was paid twice."""
        project = self.projects.get(project_id)
        return project.exports if project is not None else 0

    def billed_by_name(self) -> dict[str, int]:
        """Billed exports per project name, over every project of that name."""
        billed: dict[str, int] = {}
        for project in self.projects.values():
            if project.exports:
                billed[project.name] = billed.get(project.name, 0) + project.exports
        return billed

    def exports_named(self, name: str) -> list[SimProject]:
        """Every export created under `name`: more than one means a double export."""
        return [p for p in self.projects.values() if p.name == name and p.rendering]

    def save_project(self, project_id: str, name: str, scenes: list[Any]) -> SimProject:
        """A project saved in the editor, for the legacy import API to load."""
        project = SimProject(project_id, name, scenes, self.clock(), "saved", rendering=False)
        self.saved_projects[project_id] = project
        return project

    def download_url(self, project: SimProject) -> str:
        """Where the finished video of `project` is served."""
        return f"{self.base_url}/_simulator/videos/{project.id}.mp4"

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._api_gate], client_max_size=16 * 1024 * 1024)
        simulator_v3.install(app, self)  # first: its GET of saved projects falls through to ours
        app.router.add_post(TOKEN_PATH, self._issue_token)
        app.router.add_get(f"{V3}/auth", self._confirm_auth)
        app.router.add_post(f"{V3}/editor/project", self._create_v3)
        app.router.add_post(f"{V3}/editor/project/export", self._export_existing_v3)
        app.router.add_get(f"{V3}/editor/project", self._list_v3)
        app.router.add_get(f"{V3}/editor/project/{{id}}", self._get_v3)
        app.router.add_get(f"{V3}/editor/progress/{{id}}", self._progress_v3)
        app.router.add_post(f"{LEGACY}/editor/project", self._export_legacy)
        app.router.add_get(f"{LEGACY}/editor/project/name/{{name}}", self._legacy_by_name)
        app.router.add_get(f"{LEGACY}/editor/project/{{id}}", self._import_legacy)
        app.router.add_get(f"{LEGACY}/editor/progress/{{id}}", self._progress_legacy)
        app.router.add_get("/_simulator/state", self._state)
        app.router.add_get("/_simulator/requests", self._request_log)
        app.router.add_post("/_simulator/knobs", self._set_knobs)
        app.router.add_get("/_simulator/videos/{id}.mp4", self._video_file)
        return app

    @web.middleware
    async def _api_gate(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Record, then throttle / fail / authenticate every API request, in that order."""
        if not request.path.startswith("/api/"):
            return await handler(request)
        self.requests.append((self.clock(), request.method, request.path))
        knobs = self.knobs
        if knobs.throttle_next > 0:
            knobs.throttle_next -= 1
            self.throttles.append((self.clock(), knobs.retry_after_s))
            response = _failure(429, "too many requests")
            response.headers["Retry-After"] = f"{knobs.retry_after_s:g}"
            return response
        authorized = request.path == TOKEN_PATH or self._authorized(
            request.headers.get("Authorization")
        )
        if knobs.fail_5xx_next > 0:
            knobs.fail_5xx_next -= 1
            if authorized and (request.method, request.path) in _CREATES:
                # A 5xx on a create is ambiguous because the project may exist: make it exist.
                with contextlib.suppress(web.HTTPException):
                    await handler(request)
            return _failure(500, "internal server error")
        if not authorized:
            return _failure(401, "invalid or expired token")
        return await handler(request)

    def _authorized(self, token: str | None) -> bool:
        if not token:
            return False
        expires_at = self._tokens.get(token)
        if expires_at is not None:
            return self.clock() < expires_at
        return self.knobs.api_keys is None or token in self.knobs.api_keys

    async def _issue_token(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        app_id, user_key = body.get("appId"), body.get("userKey")
        if not (isinstance(app_id, str) and app_id and isinstance(user_key, str) and user_key):
            return _failure(400, "appId and userKey are required")
        known = self.knobs.app_credentials
        if known is not None and known.get(app_id) != user_key:
            return _failure(401, "unknown appId or userKey")
        token = f"sim-{uuid.uuid4().hex}"
        self._tokens[token] = self.clock() + self.knobs.token_ttl_s
        return _success({"token": token})

    async def _confirm_auth(self, _: web.Request) -> web.Response:
        return _success({"isAuthenticated": True})

    async def _create_v3(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        problem = _v3_body_problem(body)
        if problem:
            return _failure(400, problem)
        name = body.get("name") if isinstance(body.get("name"), str) else None
        webhook = body.get("webhookUrl") if isinstance(body.get("webhookUrl"), str) else None
        project = self._new_project(
            name or "Default Template", body["scenes"], "v3", webhook_url=webhook
        )
        project.orientation = str(body.get("orientation") or "landscape")
        if body.get("isExport") is False:
            project.rendering = False
            self._maybe_lose_response(request, draft=True)
        else:
            self._start_render(project)
            self._maybe_lose_response(request)
        return _success({"projectId": project.id})

    async def _export_existing_v3(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        project = self.projects.get(str(body.get("projectId")))
        if project is None:
            return _failure(404, "project not found")
        if isinstance(body.get("webhookUrl"), str):
            project.webhook_url = body["webhookUrl"]
        project.created_at = self.clock()
        project.rendering = True
        self._start_render(project)
        self._maybe_lose_response(request)
        return _success({"projectId": project.id})

    async def _list_v3(self, _: web.Request) -> web.Response:
        now = self.clock()
        newest_first = sorted(self.projects.values(), key=lambda p: p.created_at, reverse=True)
        entries = [
            {
                "id": p.id,
                "name": p.name,
                "state": _state(p, self._progress(p, now)),
                "download_url": self._url_if_done(p, now),
            }
            for p in newest_first
            if p.api == "v3" and p.rendering
        ]
        if self.knobs.list_only_exported:
            entries = [e for e in entries if e["state"] == "exported"]
        return _success(entries)

    async def _get_v3(self, request: web.Request) -> web.Response:
        project = self.projects.get(request.match_info["id"])
        if project is None:
            return _failure(404, "project not found")
        now = self.clock()
        return _success({"project": self._project_document(project, now)})

    async def _progress_v3(self, request: web.Request) -> web.Response:
        project = self.projects.get(request.match_info["id"])
        if project is None:
            return _failure(404, "project not found")
        now = self.clock()
        progress = self._progress(project, now)
        data: dict[str, Any] = {"progress": progress, "state": _state(project, progress)}
        url = self._url_if_done(project, now)
        if url:
            data["downloadUrl"] = url
        return _success(data)

    async def _export_legacy(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        problem = _legacy_body_problem(body)
        if problem:
            return _failure(400, problem)
        name = body.get("projectName") or body.get("name")
        project = self._new_project(
            name if isinstance(name, str) and name else "Untitled", body["scenes"], "legacy"
        )
        self._start_render(project)
        self._maybe_lose_response(request)
        return _success({"key": project.id, "cube_used": project.credit})

    async def _import_legacy(self, request: web.Request) -> web.Response:
        project_id = request.match_info["id"]
        project = self.saved_projects.get(project_id) or self.projects.get(project_id)
        if project is None:
            return _failure(404, "project not found")
        return _legacy_success(project)

    async def _legacy_by_name(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        candidates = [
            p for p in (*self.saved_projects.values(), *self.projects.values()) if p.name == name
        ]
        if not candidates:
            return _failure(404, "project not found")
        return _legacy_success(max(candidates, key=lambda p: p.created_at))

    async def _progress_legacy(self, request: web.Request) -> web.Response:
        project = self.projects.get(request.match_info["id"])
        if project is None:
            return _failure(404, "project not found")
        now = self.clock()
        data: dict[str, Any] = {"progress": self._progress(project, now)}
        url = self._url_if_done(project, now)
        if url:
            data["videoUrl"] = url
        return _success(data)

    async def _state(self, _: web.Request) -> web.Response:
        now = self.clock()
        knobs = asdict(self.knobs)
        knobs["api_keys"] = sorted(self.knobs.api_keys) if self.knobs.api_keys else None
        knobs.pop("app_credentials")
        state = {
            "base_url": self.base_url,
            "export_count": self.export_count,
            "billed_by_name": self.billed_by_name(),
            "request_count": len(self.requests),
            "callbacks_sent": len(self.callbacks),
            "projects": [
                {
                    "id": p.id,
                    "name": p.name,
                    "api": p.api,
                    "progress": self._progress(p, now),
                    "state": _state(p, self._progress(p, now)),
                    "webhook_url": p.webhook_url,
                    "exports": p.exports,
                    "render_seconds": p.render_seconds,
                }
                for p in self.projects.values()
            ],
            "knobs": knobs,
        }
        return web.Response(body=orjson.dumps(state), content_type="application/json")

    async def _request_log(self, _: web.Request) -> web.Response:
        """Every API request as it arrived, and every 429, for pacing checks in another process."""
        log = {"requests": self.requests, "throttles": self.throttles}
        return web.Response(body=orjson.dumps(log), content_type="application/json")

    async def _set_knobs(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            changes = _knob_changes(body)
        except ValueError as exc:
            return _failure(400, str(exc))
        for name, value in changes.items():
            setattr(self.knobs, name, value)
        return await self._state(request)

    async def _video_file(self, request: web.Request) -> web.Response:
        if request.match_info["id"] not in self.projects:
            raise web.HTTPNotFound
        return web.Response(body=self._video, content_type="video/mp4")

    def _new_project(
        self, name: str, scenes: list[Any], api: str, *, webhook_url: str | None = None
    ) -> SimProject:
        project_id = uuid.uuid4().hex[:24]
        project = SimProject(project_id, name, scenes, self.clock(), api, webhook_url=webhook_url)
        self.projects[project_id] = project
        return project

    def _start_render(self, project: SimProject) -> None:
        """Bill the export and let it render; a failing render stalls and never calls back."""
        self.export_count += 1
        project.exports += 1
        project.backend_task_id = uuid.uuid4().hex
        jitter = self.knobs.render_jitter
        spread = 1.0 + jitter * (2.0 * self._rng.random() - 1.0) if jitter else 1.0
        project.render_seconds = self.knobs.render_seconds * spread
        if self.knobs.failing_renders_next > 0:
            self.knobs.failing_renders_next -= 1
            project.stall_at = self.knobs.stall_at
        _log.info("simulator_export", project_id=project.id, name=project.name, api=project.api)
        if project.webhook_url and project.stall_at is None and self._tasks is not None:
            self._tasks.start_soon(self._call_back, project, project.created_at)

    def _maybe_lose_response(self, request: web.Request, *, draft: bool = False) -> None:
        """Drop the connection after the create, so the client cannot know it happened."""
        knob = "lose_response_next_drafts" if draft else "lose_response_next_exports"
        left = getattr(self.knobs, knob)
        if left <= 0:
            return
        setattr(self.knobs, knob, left - 1)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    def _progress(self, project: SimProject, now: float) -> float:
        """A project's progress as the API shows it now (held short of done on request)."""
        progress = project.progress_at(now)
        return min(progress, _HELD_AT) if self.knobs.hold_renders else progress

    def _url_if_done(self, project: SimProject, now: float) -> str | None:
        return self.download_url(project) if self._progress(project, now) >= _DONE else None

    def _project_document(self, project: SimProject, now: float) -> dict[str, Any]:
        return {
            "_id": project.id,
            "name": project.name,
            "orientation": project.orientation,
            "scenes": project.scenes,
            "userId": "simulator",
            "templateId": None,
            "state": _state(project, self._progress(project, now)),
            "thumbnailUrl": None,
            "baseInfoId": project.id,
            "dictionary": {},
            "backendTaskId": project.backend_task_id,
            "exportType": "video",
            "progress": int(self._progress(project, now)),
            "creditSubstracted": project.exports > 0,
            "createdAt": project.created_at,
            "updatedAt": now,
            "download_url": self._url_if_done(project, now),
        }

    async def _supervise(self, ready: asyncio.Event) -> None:
        """Own every callback task, so stop() cancels them all at once."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            ready.set()
            try:
                await anyio.sleep_forever()
            finally:
                self._tasks = None

    async def _call_back(self, project: SimProject, render_started_at: float) -> None:
        """POST the documented completion callback once the render reaches 100."""
        while self._progress(project, self.clock()) < _DONE:
            remaining = project.created_at + project.render_seconds - self.clock()
            if self.knobs.hold_renders:
                remaining = _CALLBACK_CHECK_S  # done or not, nothing finishes until released
            await anyio.sleep(min(max(remaining, 0.0), _CALLBACK_CHECK_S) or _CALLBACK_CHECK_S / 10)
        await anyio.sleep(self.knobs.callback_delay_s)
        if project.created_at != render_started_at or not project.webhook_url or self._http is None:
            return
        payload = {
            "progress": 100,
            "credit": project.credit,
            "backendTaskId": project.backend_task_id,
            "download_url": self.download_url(project),
        }
        status: int | None = None
        try:
            async with self._http.post(project.webhook_url, json=payload) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            _log.warning("simulator_callback_failed", project_id=project.id, error=repr(exc))
        self.callbacks.append((project.webhook_url, payload, status))


async def run_simulator(
    host: str,
    port: int,
    knobs: SimulatorKnobs,
    shutdown: anyio.Event,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the simulator until `shutdown` is set (the `simulator` command's body).

    Under `await tg.start(run_simulator, ...)` the base URL is handed back once bound.
    """
    simulator = Simulator(knobs)
    base_url = await simulator.start(host, port)
    _log.info("simulator_listening", base_url=base_url, render_seconds=knobs.render_seconds)
    task_status.started(base_url)
    try:
        await shutdown.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await simulator.stop()


def _success(data: Any) -> web.Response:  # noqa: ANN401 - any JSON value
    return web.Response(
        body=orjson.dumps({"success": True, "data": data}), content_type="application/json"
    )


def _legacy_success(project: SimProject) -> web.Response:
    body = {"success": True, "response": {"projectName": project.name, "scenes": project.scenes}}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _failure(status: int, message: str) -> web.Response:
    body = {"success": False, "msg": message}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _state(project: SimProject, progress: float) -> str:
    if not project.rendering:
        return "draft"
    return "exported" if progress >= _DONE else "exporting"


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _bad_request("body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    return body


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"success": False, "msg": message}).decode(),
        content_type="application/json",
    )


def _v3_body_problem(body: dict[str, Any]) -> str | None:
    """The v3 export page's required fields: scenes[], each with sceneIdx, background, clips."""
    scenes = body.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        return "scenes is required (a non-empty array)"
    for index, scene in enumerate(scenes):
        if not isinstance(scene, dict):
            return f"scenes[{index}] must be an object"
        if not isinstance(scene.get("sceneIdx"), int) or isinstance(scene.get("sceneIdx"), bool):
            return f"scenes[{index}].sceneIdx is required (Int)"
        if not isinstance(scene.get("background"), dict):
            return f"scenes[{index}].background is required (Json)"
        if not isinstance(scene.get("clips"), list):
            return f"scenes[{index}].clips is required (Array)"
    return None


def _legacy_body_problem(body: dict[str, Any]) -> str | None:
    """The legacy export page's required fields: scenes[], each with an AIModel clip."""
    scenes = body.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        return "scenes is required (a non-empty array)"
    for index, scene in enumerate(scenes):
        if not isinstance(scene, dict) or not isinstance(scene.get("AIModel"), dict):
            return f"scenes[{index}].AIModel is required (Json)"
        clips = scene.get("clips", [])
        if not isinstance(clips, list):
            return f"scenes[{index}].clips must be an array"
    return None


def _knob_changes(body: dict[str, Any]) -> dict[str, Any]:
    """Validate a JSON subset of SimulatorKnobs sent by a test in another process."""
    known = {f.name for f in fields(SimulatorKnobs)}
    unknown = [name for name in body if name not in known]
    if unknown:
        raise ValueError(f"unknown knob {unknown[0]!r}")
    return {name: _knob_value(name, value) for name, value in body.items()}


def _knob_value(name: str, value: object) -> object:
    """One knob's JSON value as SimulatorKnobs holds it; ValueError names what was expected."""
    if name in _INT_KNOBS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer")
        return value
    if name in _FLOAT_KNOBS:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative number")
        return float(value)
    if name in _BOOL_KNOBS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if name == "api_keys":
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ValueError("api_keys must be null or a list of strings")
        return None if value is None else frozenset(value)
    if value is not None and not (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    ):
        raise ValueError(f"{name} must be null or an object of strings")
    return value


def _sample_legacy_scene() -> dict[str, Any]:
    """The legacy export page's sample scene, so the import tutorial works out of the box."""
    return {
        "AIModel": {
            "script": "Sample script for exporting project.",
            "model": "M000004017",
            "clothes": "BG00006160",
            "language": "en",
            "locationX": -0.28,
            "locationY": 0.19,
            "scale": 1,
        },
        "clips": [
            {
                "type": "background",
                "detail": {
                    "url": "https://cdn.aistudios.com/images/news/aiplatform_background_gradient.png"
                },
            },
            {
                "type": "image",
                "detail": {
                    "url": "https://cdn.aistudios.com/images/news/aiplatform_background_space.png",
                    "locationX": 0.3,
                    "locationY": -0.3,
                    "scale": 1,
                },
            },
            {
                "type": "text",
                "detail": {"textSource": "hello!", "locationX": -0.2, "locationY": -0.2},
            },
        ],
    }
