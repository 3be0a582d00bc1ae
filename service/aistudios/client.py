"""AI Studios HTTP client for both API generations, with token auth and typed errors.

Every export is billed and the API has no idempotency key, so the one thing this module must
get right is the error class: a create whose outcome is unknown is `AmbiguousError` (the job
layer reconciles it by name), never something a caller would blindly repeat. The client never
retries on its own except once after a 401, which created nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from yarl import URL

from service.aistudios import responses, templates_v3
from service.aistudios.errors import (
    AIStudiosError,
    AmbiguousError,
    AuthError,
    PermanentError,
    RetryableError,
)
from service.aistudios.responses import (
    Progress,
    ProjectState,
    ProjectSummary,
    UnreadableResponseError,
)
from service.log import get_logger, register_secrets
from service.retry_after import parse_retry_after

__all__ = ["AIStudiosClient", "Progress", "ProjectState", "ProjectSummary"]

_T = TypeVar("_T")
_log = get_logger("aistudios.client")
_REFRESH_AT_FRACTION = 0.9
_HTTP_UNAUTHORIZED = 401
_HTTP_TOO_MANY_REQUESTS = 429
_HTTP_SERVER_ERROR = 500
_HTTP_OK_RANGE = range(200, 300)
_EXPORTED = "exported"


class _UnauthorizedError(AuthError):
    """A 401 that one token refresh may still cure; never leaves the client."""


@dataclass(frozen=True, slots=True)
class _Call:
    """One HTTP exchange: `create` marks the billed POSTs whose loss is ambiguous."""

    endpoint: str
    method: str
    url: str
    body: dict[str, Any] | None = None
    create: bool = False
    authenticated: bool = True


class AIStudiosClient:
    """The documented AI Studios endpoints (v3 and legacy) behind one session per API host.

    `before_request(endpoint)` is awaited before every HTTP request so a shared rate limiter
    sees token refreshes and 401 retries too; `on_call(endpoint, outcome)` reports each
    request's outcome ("ok", "retryable", "permanent", "ambiguous", "auth").
    """

    def __init__(
        self,
        *,
        base_url: str,
        legacy_base_url: str,
        api_key: str | None = None,
        app_id: str | None = None,
        user_key: str | None = None,
        request_timeout_s: float = 30.0,
        before_request: Callable[[str], Awaitable[None]] | None = None,
        on_call: Callable[[str, str], None] | None = None,
        token_ttl_s: float = 24 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not api_key and not (app_id and user_key):
            raise ValueError("AI Studios needs api_key, or app_id and user_key")
        register_secrets([api_key, user_key])
        self._base_url = base_url.rstrip("/")
        self._legacy_base_url = legacy_base_url.rstrip("/")
        self._api_key = api_key or None
        self._app_id = app_id
        self._user_key = user_key
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, connect=request_timeout_s / 2
        )
        self._before_request = before_request
        self._on_call = on_call
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._token: str | None = self._api_key
        self._refresh_at = float("inf")
        self._token_lock = anyio.Lock()
        self._sessions: dict[URL, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> Self:
        for base in (self._base_url, self._legacy_base_url):
            origin = URL(base).origin()
            if origin not in self._sessions:
                self._sessions[origin] = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def export_v3(
        self, body: dict[str, Any], *, name: str, webhook_url: str | None = None
    ) -> str:
        """Create and export in one billed call; `name` is what a lost response is found by."""
        payload = {**body, "name": name}
        if webhook_url:
            payload["webhookUrl"] = webhook_url
        call = _Call("v3.export", "POST", self._v3("editor/project"), payload, create=True)
        return await self._call(call, responses.parse_project_id)

    async def create_draft_v3(self, body: dict[str, Any], *, name: str) -> str:
        """Create a project WITHOUT exporting it (`isExport: false`, not billed); its id.

        The first step of the two-step flow: the paid call then addresses a project that
        already exists, so an uncertain export can be settled by reading that project. A lost
        response leaves at worst an unexported draft in the dashboard.
        """
        payload = {**body, "name": name, "isExport": False}
        payload.pop("webhookUrl", None)
        call = _Call("v3.draft", "POST", self._v3("editor/project"), payload, create=True)
        return await self._call(call, responses.parse_project_id)

    async def export_project_v3(self, project_id: str, *, webhook_url: str | None = None) -> str:
        """Export an existing project (billed, again for each call); returns its project id."""
        payload: dict[str, Any] = {"projectId": project_id}
        if webhook_url:
            payload["webhookUrl"] = webhook_url
        call = _Call(
            "v3.project_export", "POST", self._v3("editor/project/export"), payload, create=True
        )
        return await self._call(call, responses.parse_project_id)

    async def get_project_v3(self, project_id: str) -> ProjectState:
        """One project with its export status (`state`, `progress`, `creditSubstracted`, ...)."""
        url = self._v3(f"editor/project/{_segment(project_id)}")

        def parse(body: Any) -> ProjectState:  # noqa: ANN401 - a JSON document is of any shape
            return responses.parse_project_state(body, project_id)

        return await self._call(_Call("v3.project", "GET", url), parse)

    async def progress_v3(self, project_id: str) -> Progress:
        """Render progress of a v3 export."""
        url = self._v3(f"editor/progress/{_segment(project_id)}")
        return await self._call(_Call("v3.progress", "GET", url), responses.parse_progress)

    async def list_projects_v3(self) -> list[ProjectSummary]:
        """Projects of the account, for reconciling a create whose response was lost."""
        call = _Call("v3.list", "GET", self._v3("editor/project"))
        return await self._call(call, responses.parse_project_list)

    async def find_project_by_name(self, name: str) -> ProjectSummary | None:
        """The project created under an export name, preferring one that finished exporting."""
        matches = [p for p in await self.list_projects_v3() if p.name == name]
        finished = [p for p in matches if p.state == _EXPORTED or p.download_url]
        candidates = finished or matches
        return candidates[0] if candidates else None

    async def confirm_auth(self) -> bool:
        """Whether the credentials work; refused credentials answer False, not an error."""
        try:
            return await self._call(
                _Call("v3.auth", "GET", self._v3("auth")), responses.parse_is_authenticated
            )
        except AuthError:
            return False

    async def import_project_legacy(self, project_id: str) -> dict[str, Any]:
        """A saved project's `response` (`projectName`, `scenes`) to change and re-export."""
        url = self._legacy(f"editor/project/{_segment(project_id)}")
        return await self._call(_Call("legacy.import", "GET", url), responses.parse_legacy_project)

    async def export_legacy(self, scenes: list[dict[str, Any]]) -> str:
        """Billed legacy export of (changed) scenes; returns the project key to poll."""
        call = _Call(
            "legacy.export",
            "POST",
            self._legacy("editor/project"),
            {"scenes": scenes},
            create=True,
        )
        return await self._call(call, responses.parse_legacy_key)

    async def progress_legacy(self, key: str) -> Progress:
        """Render progress of a legacy export (`videoUrl`, or `url` as the tutorial reads)."""
        url = self._legacy(f"editor/progress/{_segment(key)}")
        return await self._call(_Call("legacy.progress", "GET", url), responses.parse_progress)

    # --- saved v3 projects and server-side templates (bodies in templates_v3.py) ---------

    async def fetch_saved_project_v3(self, project_id: str) -> dict[str, Any]:
        """A project saved in the v3 editor, as a template: its `name`, `orientation`, `scenes`."""
        url = self._v3(f"editor/project/{_segment(project_id)}")
        call = _Call("v3.saved_project", "GET", url)
        return await self._call(call, templates_v3.parse_saved_project)

    async def template_modify(
        self,
        template_id: str,
        updates: dict[str, str],
        *,
        name: str,
        webhook_url: str | None = None,
    ) -> str:
        """Billed: a project from a server-side template with `updates`, exported at once.

        `name` is what a lost response is found by, as for `export_v3`.
        """
        body = templates_v3.modify_body(
            ("templateId", template_id), updates, name=name, webhook_url=webhook_url
        )
        call = _Call("v3.template_modify", "POST", self._v3("template/modify"), body, create=True)
        return await self._call(call, responses.parse_project_id)

    async def project_modify(
        self,
        project_id: str,
        updates: dict[str, str],
        *,
        name: str | None = None,
        webhook_url: str | None = None,
    ) -> str:
        """Billed: change an existing project's tagged clips and scripts and export it."""
        body = templates_v3.modify_body(
            ("projectId", project_id), updates, name=name, webhook_url=webhook_url
        )
        call = _Call("v3.project_modify", "POST", self._v3("project/modify"), body, create=True)
        return await self._call(call, responses.parse_project_id)

    def _v3(self, path: str) -> str:
        return f"{self._base_url}/api/odin/v3/{path}"

    def _legacy(self, path: str) -> str:
        return f"{self._legacy_base_url}/api/odin/{path}"

    async def _call(self, call: _Call, parse: Callable[[Any], _T]) -> _T:
        """Send with the current token; on a 401 refresh once and send again."""
        token = await self._current_token()
        try:
            return await self._send(call, token, parse)
        except _UnauthorizedError as first:
            if self._api_key is not None:
                raise AuthError(
                    first.message, status=first.status, endpoint=call.endpoint
                ) from None
        await self._refresh_token(stale=token)
        try:
            return await self._send(call, await self._current_token(), parse)
        except _UnauthorizedError as second:
            raise AuthError(second.message, status=second.status, endpoint=call.endpoint) from None

    async def _current_token(self) -> str:
        if self._token is None or self._clock() >= self._refresh_at:
            await self._refresh_token(stale=self._token)
        if self._token is None:  # pragma: no cover - _refresh_token sets it or raises
            raise AuthError("no API token")
        return self._token

    async def _refresh_token(self, *, stale: str | None) -> None:
        """One refresh for all concurrent callers: whoever waited finds the new token."""
        async with self._token_lock:
            fresh = self._token is not None and self._clock() < self._refresh_at
            if self._token != stale and fresh:
                return
            issued_at = self._clock()
            call = _Call(
                "auth.token",
                "POST",
                self._v3("auth/token"),
                {"appId": self._app_id, "userKey": self._user_key},
                authenticated=False,
            )
            try:
                token = await self._send(call, None, responses.parse_token)
            except PermanentError as exc:
                raise AuthError(exc.message, status=exc.status, endpoint=call.endpoint) from None
            register_secrets([token])
            self._token = token
            self._refresh_at = issued_at + self._token_ttl_s * _REFRESH_AT_FRACTION
            _log.info("aistudios_token_issued", ttl_s=self._token_ttl_s)

    async def _send(self, call: _Call, token: str | None, parse: Callable[[Any], _T]) -> _T:
        """One HTTP request, classified; reports its outcome whatever happens."""
        if self._before_request is not None:
            await self._before_request(call.endpoint)
        try:
            result = await self._exchange(call, token, parse)
        except AIStudiosError as exc:
            self._report(call.endpoint, exc.code)
            _log.warning(
                "aistudios_call_failed",
                endpoint=call.endpoint,
                outcome=exc.code,
                status=exc.status,
                error=exc.message,
            )
            raise
        self._report(call.endpoint, "ok")
        return result

    async def _exchange(self, call: _Call, token: str | None, parse: Callable[[Any], _T]) -> _T:
        headers = {"Content-Type": "application/json"}
        if call.authenticated and token is not None:
            headers["Authorization"] = token
        data = orjson.dumps(call.body) if call.body is not None else None
        session = self._session_for(call.url)
        try:
            async with session.request(
                call.method,
                call.url,
                data=data,
                headers=headers,
                allow_redirects=call.method == "GET",
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                raw = await response.read()
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            raise RetryableError(
                f"could not connect: {type(exc).__name__}", endpoint=call.endpoint
            ) from exc
        except aiohttp.InvalidUrlClientError as exc:
            raise PermanentError(f"invalid URL: {exc}", endpoint=call.endpoint) from exc
        except TimeoutError as exc:
            raise _lost(call, "timed out waiting for the response") from exc
        except aiohttp.ClientError as exc:
            raise _lost(call, f"response lost: {type(exc).__name__}") from exc
        return _interpret(call, status, retry_after, raw, parse)

    def _session_for(self, url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(URL(url).origin())
        if session is None:
            raise RuntimeError("AIStudiosClient used outside `async with`")
        return session

    def _report(self, endpoint: str, outcome: str) -> None:
        if self._on_call is not None:
            self._on_call(endpoint, outcome)


def _interpret(
    call: _Call, status: int, retry_after: str | None, raw: bytes, parse: Callable[[Any], _T]
) -> _T:
    """Classify a received response by what is certain: status, then the documented body."""
    if status == _HTTP_UNAUTHORIZED:
        raise _UnauthorizedError("credentials refused (401)", status=status, endpoint=call.endpoint)
    if status == _HTTP_TOO_MANY_REQUESTS:
        raise RetryableError(
            "throttled (429)",
            status=status,
            endpoint=call.endpoint,
            retry_after_s=parse_retry_after(retry_after),
        )
    if status >= _HTTP_SERVER_ERROR:
        if call.create:
            raise AmbiguousError(
                f"server error {status} on a create", status=status, endpoint=call.endpoint
            )
        raise RetryableError(f"server error {status}", status=status, endpoint=call.endpoint)
    if status not in _HTTP_OK_RANGE:
        message = _body_message(raw) or f"HTTP {status}"
        raise PermanentError(message, status=status, endpoint=call.endpoint)
    try:
        body = responses.parse_json(raw)
        failure = responses.failure_message(body)
        if failure is not None:
            raise PermanentError(failure, status=status, endpoint=call.endpoint)
        return parse(body)
    except UnreadableResponseError as exc:
        raise _lost(call, f"unreadable response: {exc}", status=status) from exc


def _lost(call: _Call, reason: str, *, status: int | None = None) -> AIStudiosError:
    """No usable answer: a create may have happened, a read can simply be repeated."""
    if call.create:
        return AmbiguousError(reason, status=status, endpoint=call.endpoint)
    return RetryableError(reason, status=status, endpoint=call.endpoint)


def _body_message(raw: bytes) -> str | None:
    try:
        return responses.error_message(responses.parse_json(raw))
    except UnreadableResponseError:
        return None


def _segment(value: str) -> str:
    """Quote an id or name so it stays one path segment."""
    return quote(value, safe="")
