"""Pure parsing of AI Studios response bodies into what the client returns.

The vendor's pages and tutorials disagree on envelopes (fields inside `data` or at the top,
`downloadUrl` vs `download_url` vs `videoUrl` vs `url`, progress as a number or a numeric
string), so every reader here accepts each documented variant instead of the simulator's own
choice. Nothing here does I/O: the client decides what an unreadable body means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

_DOWNLOAD_URL_KEYS = ("downloadUrl", "download_url", "videoUrl", "url")
_MESSAGE_KEYS = ("msg", "message", "error")
_LIST_KEYS = ("projects", "items", "list", "results")
_PROGRESS_DONE = 100.0


class UnreadableResponseError(ValueError):
    """The body is not what the docs describe; the caller decides if anything was created."""


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress reading: the API documents no failure state, so this is all there is."""

    progress: float
    download_url: str | None

    @property
    def done(self) -> bool:
        """Finished only with a URL: 100 without a URL is not yet downloadable."""
        return self.progress >= _PROGRESS_DONE and bool(self.download_url)


@dataclass(frozen=True, slots=True)
class ProjectSummary:
    """A listed project: enough to reconcile a lost create by its export name."""

    id: str
    name: str
    state: str | None
    download_url: str | None


@dataclass(frozen=True, slots=True)
class ProjectState:
    """A v3 project as `GET /editor/project/{id}` shows it, read for its export status.

    The reference documents `state`, `progress`, `creditSubstracted`, `backendTaskId` and
    `download_url` but not their values for a project never exported, so `export_started`
    trusts any one positive sign and nothing else; `document` is the whole `project` object.
    """

    id: str
    state: str | None
    progress: float
    credit_subtracted: bool
    backend_task_id: str | None
    download_url: str | None
    document: dict[str, Any]

    @property
    def export_started(self) -> bool:
        """Whether any documented field shows that an export of this project began (billed)."""
        return (
            self.credit_subtracted
            or bool(self.backend_task_id)
            or self.progress > 0
            or self.state == "exported"
            or bool(self.download_url)
        )


def parse_json(raw: bytes) -> Any:  # noqa: ANN401 - a JSON document is of any shape
    """Decode a body, turning garbage into one error type the client can classify."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UnreadableResponseError("response body is not JSON") from exc


def failure_message(body: Any) -> str | None:  # noqa: ANN401 - a JSON document is of any shape
    """The message of a documented `success: false`, or None when the call succeeded."""
    if isinstance(body, dict) and body.get("success") is False:
        return error_message(body) or "success: false without a message"
    return None


def error_message(body: Any) -> str | None:  # noqa: ANN401 - a JSON document is of any shape
    """Best human message in an error body: `msg`, `message` or `error` (string or object)."""
    for scope in _scopes(body):
        for key in _MESSAGE_KEYS:
            value = scope.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict):
                nested = error_message(value)
                if nested:
                    return nested
    return None


def parse_progress(body: Any) -> Progress:  # noqa: ANN401 - a JSON document is of any shape
    """Progress from either API generation; a numeric string such as "42.50" is accepted."""
    scope = _scope_with(body, "progress")
    if scope is None:
        raise UnreadableResponseError("progress missing")
    progress = _as_progress(scope["progress"])
    return Progress(progress=progress, download_url=_download_url(body))


def parse_project_id(body: Any) -> str:  # noqa: ANN401 - a JSON document is of any shape
    """`projectId` of a v3 create."""
    return _required_str(body, "projectId")


def parse_legacy_key(body: Any) -> str:  # noqa: ANN401 - a JSON document is of any shape
    """`key` of a legacy export (the tutorial reads `res.data.key`)."""
    return _required_str(body, "key")


def parse_token(body: Any) -> str:  # noqa: ANN401 - a JSON document is of any shape
    """The API token at `data.token` (the docs' full code) or `token` (the field table)."""
    return _required_str(body, "token")


def parse_is_authenticated(body: Any) -> bool:  # noqa: ANN401 - a JSON document is of any shape
    """`isAuthenticated`; anything but a literal true counts as not authenticated."""
    scope = _scope_with(body, "isAuthenticated")
    if scope is None:
        raise UnreadableResponseError("isAuthenticated missing")
    return scope["isAuthenticated"] is True


def parse_legacy_project(body: Any) -> dict[str, Any]:  # noqa: ANN401 - a JSON document is of any shape
    """The `response` object of a legacy import (`response.scenes`, `response.projectName`)."""
    scope = _scope_with(body, "response")
    if scope is not None and isinstance(scope["response"], dict):
        project: dict[str, Any] = scope["response"]
        return project
    raise UnreadableResponseError("response missing")


def parse_project_state(body: Any, project_id: str) -> ProjectState:  # noqa: ANN401 - a JSON document is of any shape
    """`data.project` of a v3 project read (also a bare `project`, or the fields at the top)."""
    scope = _scope_with(body, "project")
    project = scope["project"] if scope is not None else None
    if not isinstance(project, dict):
        scopes = _scopes(body)
        if not scopes:
            raise UnreadableResponseError("project missing")
        project = scopes[0]
    progress = project.get("progress")
    credit = project.get("creditSubstracted")
    return ProjectState(
        id=_first_str(project, ("_id", "id", "projectId")) or project_id,
        state=_first_str(project, ("state",)),
        progress=_as_progress(progress) if progress is not None else 0.0,
        credit_subtracted=credit is True or credit == "true",
        backend_task_id=_first_str(project, ("backendTaskId",)),
        download_url=_first_str(project, _DOWNLOAD_URL_KEYS),
        document=project,
    )


def parse_project_list(body: Any) -> list[ProjectSummary]:  # noqa: ANN401 - a JSON document is of any shape
    """Listed projects; entries without an id cannot be reconciled and are left out."""
    entries = _project_entries(body)
    summaries: list[ProjectSummary] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        project_id = _first_str(entry, ("id", "_id", "projectId"))
        if project_id is None:
            continue
        summaries.append(
            ProjectSummary(
                id=project_id,
                name=_first_str(entry, ("name", "projectName")) or "",
                state=_first_str(entry, ("state",)),
                download_url=_first_str(entry, _DOWNLOAD_URL_KEYS),
            )
        )
    return summaries


def _scopes(body: Any) -> list[dict[str, Any]]:  # noqa: ANN401 - a JSON document is of any shape
    """Where documented fields may live: inside `data` first, then the top level."""
    if not isinstance(body, dict):
        return []
    data = body.get("data")
    return [data, body] if isinstance(data, dict) else [body]


def _scope_with(body: Any, key: str) -> dict[str, Any] | None:  # noqa: ANN401 - a JSON document is of any shape
    for scope in _scopes(body):
        if key in scope:
            return scope
    return None


def _required_str(body: Any, key: str) -> str:  # noqa: ANN401 - a JSON document is of any shape
    for scope in _scopes(body):
        value = scope.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    raise UnreadableResponseError(f"{key} missing")


def _first_str(scope: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = scope.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _download_url(body: Any) -> str | None:  # noqa: ANN401 - a JSON document is of any shape
    for scope in _scopes(body):
        url = _first_str(scope, _DOWNLOAD_URL_KEYS)
        if url:
            return url
    return None


def _as_progress(value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        raise UnreadableResponseError("progress is a boolean")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().removesuffix("%"))
        except ValueError as exc:
            raise UnreadableResponseError(f"progress {value!r} is not a number") from exc
    else:
        raise UnreadableResponseError("progress is not a number")
    if math.isnan(number):
        raise UnreadableResponseError("progress is NaN")
    return min(_PROGRESS_DONE, max(0.0, number))


def _project_entries(body: Any) -> list[Any]:  # noqa: ANN401 - a JSON document is of any shape
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        raise UnreadableResponseError("project list is not an object or array")
    data = body.get("data")
    if isinstance(data, list):
        return data
    for scope in _scopes(body):
        for key in _LIST_KEYS:
            value = scope.get(key)
            if isinstance(value, list):
                return value
    raise UnreadableResponseError("project list missing")
