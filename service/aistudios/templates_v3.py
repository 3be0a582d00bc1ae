"""Saved v3 projects and server-side templates: request bodies and response readers, pure.

Two documented ways to make a video from a template sit beside the JSON-file export:
- a project saved in the v3 editor, read with `GET /api/odin/v3/editor/project/{id}` and
  patched like a template file (the tutorial "Exporting a Pre-made Project to Video");
- a server-side template changed and exported by `POST /api/odin/v3/template/modify`
  (or an existing project by `POST /api/odin/v3/project/modify`) with an `updates` dictionary.

`isExport` of the two modify calls defaults to false, which creates a project and renders
nothing: studiohook wants the video, so the body always says `isExport: true`.
"""

from __future__ import annotations

from typing import Any

from service.aistudios.responses import UnreadableResponseError

EXPORT_FIELDS = ("name", "orientation", "scenes")
"""What the tutorial sends back to `POST …/editor/project` after changing a saved project."""


def parse_saved_project(body: Any) -> dict[str, Any]:  # noqa: ANN401 - a JSON document is of any shape
    """`data.project` of the v3 get-project page, reduced to what an export sends.

    Server fields (`_id`, `state`, `progress`, `creditSubstracted`, …) describe the saved
    project, not the new one, so they are left out of the template.
    """
    project = None
    scopes = [body.get("data"), body] if isinstance(body, dict) else []
    for scope in scopes:
        if isinstance(scope, dict) and isinstance(scope.get("project"), dict):
            project = scope["project"]
            break
    if project is None:
        raise UnreadableResponseError("project missing")
    if not isinstance(project.get("scenes"), list):
        raise UnreadableResponseError("project.scenes missing")
    return {key: project[key] for key in EXPORT_FIELDS if project.get(key) is not None}


def modify_body(
    target: tuple[str, str],
    updates: dict[str, str],
    *,
    name: str | None,
    webhook_url: str | None,
) -> dict[str, Any]:
    """The body of template/modify (`("templateId", id)`) or project/modify (`("projectId", id)`).

    `isExport: true` is always there: the documented default is false (no video).
    """
    key, value = target
    body: dict[str, Any] = {key: value, "updates": dict(updates), "isExport": True}
    if name is not None:
        body["name"] = name
    if webhook_url:
        body["webhookUrl"] = webhook_url
    return body
