"""The simulator's saved v3 projects and server-side templates, as the reference pages say.

Kept apart from `simulator.py` and registered from it with one call, so the template flows
(`GET …/editor/project/{id}` of a saved project, `POST …/template/modify`, `POST …/project/
modify`) read in one place. Facts followed (aistudios-api/v3/more-ways-to-make-a-video.md):
- a saved project is a v3 project that was never exported: `GET …/editor/project/{id}`
  returns it whole, clips with their editor `tag`, scenes with their `scripts`;
- `updates` keys are `title`, `subtitles` or `scripts` with an optional `_N` suffix: the
  (N+1)-th clip with that tag in video order, or the script of scene N+1; any other key, or
  a suffix beyond what the template has, is refused (`success: false`) and creates nothing;
- `isExport` defaults to false: the project is created (and shown in the dashboard) but not
  exported, not billed, and never reaches progress 100.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.mapping.updates import UpdateKeyError, apply_updates

if TYPE_CHECKING:
    from service.aistudios.simulator import SimProject, Simulator

V3 = "/api/odin/v3"
TEMPLATE_MODIFY_PATH = f"{V3}/template/modify"
PROJECT_MODIFY_PATH = f"{V3}/project/modify"
SAMPLE_PROJECT_ID = "sample-v3-project"
SAMPLE_TEMPLATE_ID = "sample-template"
SAMPLE_LAYOUT_PROJECT_ID = "sample-template-layout"
"""A saved project made from the sample template: what `layout_project_id` points at."""


def install(app: web.Application, simulator: Simulator) -> None:
    """Add the template routes to the simulator's app and seed the samples the README uses."""
    handlers = _Handlers(simulator)
    app.router.add_get(f"{V3}/editor/project/{{id}}", handlers.get_project)
    app.router.add_post(TEMPLATE_MODIFY_PATH, handlers.template_modify)
    app.router.add_post(PROJECT_MODIFY_PATH, handlers.project_modify)
    save_v3_project(simulator, SAMPLE_PROJECT_ID, sample_saved_project())
    save_server_template(simulator, SAMPLE_TEMPLATE_ID, sample_server_template())
    save_v3_project(simulator, SAMPLE_LAYOUT_PROJECT_ID, sample_server_template())


def save_v3_project(simulator: Simulator, project_id: str, document: dict[str, Any]) -> SimProject:
    """A project saved in the v3 editor (never exported), readable with GET …/project/{id}.

    Kept apart from the simulator's exports, so `projects` and `exports_named` hold only
    what the API was asked to create.
    """
    from service.aistudios.simulator import SimProject  # noqa: PLC0415 - simulator imports us

    project = SimProject(
        project_id,
        str(document.get("name") or "Saved project"),
        copy.deepcopy(document["scenes"]),
        simulator.clock(),
        "v3",
        rendering=False,
        orientation=str(document.get("orientation") or "landscape"),
    )
    simulator.saved_v3_projects[project_id] = project
    return project


def save_server_template(simulator: Simulator, template_id: str, document: dict[str, Any]) -> None:
    """A server-side template, for template/modify to copy."""
    simulator.server_templates[template_id] = copy.deepcopy(document)


class _Handlers:
    def __init__(self, simulator: Simulator) -> None:
        self.sim = simulator
        self.received: list[dict[str, Any]] = simulator.modify_requests

    async def get_project(self, request: web.Request) -> web.StreamResponse:
        """A saved project, whole; any other id is the simulator's own GET (its exports)."""
        project = self.sim.saved_v3_projects.get(request.match_info["id"])
        if project is None:
            return await self.sim._get_v3(request)  # noqa: SLF001 - the simulator's own sub-module
        document = self.sim._project_document(project, self.sim.clock())  # noqa: SLF001
        return web.json_response({"success": True, "data": {"project": document}})

    async def template_modify(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        self.received.append(body)
        problem = _modify_problem(body, "templateId")
        if problem is not None:
            return _failure(400, problem)
        template = self.sim.server_templates.get(body["templateId"])
        if template is None:
            return _failure(404, "template not found")
        try:
            scenes = apply_updates(template, body["updates"])["scenes"]
        except UpdateKeyError as exc:
            return _failure(400, str(exc))
        name = body.get("name") or str(template.get("name") or "Untitled")
        project = self.sim._new_project(  # noqa: SLF001 - the simulator's own sub-module
            name, scenes, "v3", webhook_url=body.get("webhookUrl")
        )
        project.orientation = str(template.get("orientation") or "landscape")
        project.rendering = False  # a draft until `_maybe_export` says otherwise
        return self._maybe_export(request, project, exporting=body.get("isExport") is True)

    async def project_modify(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        self.received.append(body)
        problem = _modify_problem(body, "projectId")
        if problem is not None:
            return _failure(400, problem)
        project_id = body["projectId"]
        project = self.sim.saved_v3_projects.get(project_id) or self.sim.projects.get(project_id)
        if project is None:
            return _failure(404, "project not found")
        try:
            scenes = apply_updates({"scenes": project.scenes}, body["updates"])["scenes"]
        except UpdateKeyError as exc:
            return _failure(400, str(exc))
        project.scenes = scenes
        if isinstance(body.get("name"), str):
            project.name = body["name"]
        if isinstance(body.get("webhookUrl"), str):
            project.webhook_url = body["webhookUrl"]
        exporting = body.get("isExport") is True
        if exporting:  # from now on it is an export the API was asked for
            project.created_at = self.sim.clock()
            self.sim.saved_v3_projects.pop(project.id, None)
            self.sim.projects[project.id] = project
        return self._maybe_export(request, project, exporting=exporting)

    def _maybe_export(
        self, request: web.Request, project: SimProject, *, exporting: bool
    ) -> web.Response:
        if exporting:
            project.rendering = True
            self.sim._start_render(project)  # noqa: SLF001 - the simulator's own sub-module
            self.sim._maybe_lose_response(request)  # noqa: SLF001
        return web.json_response({"success": True, "data": {"projectId": project.id}})


def _modify_problem(body: dict[str, Any], id_key: str) -> str | None:
    """The documented fields: the id and `updates` required, the rest optional and typed."""
    if not isinstance(body.get(id_key), str) or not body[id_key]:
        return f"{id_key} is required (String)"
    updates = body.get("updates")
    if not isinstance(updates, dict):
        return "updates is required (a dictionary)"
    for key, value in updates.items():
        if not isinstance(value, str):
            return f"updates.{key} must be a string"
    if "isExport" in body and not isinstance(body["isExport"], bool):
        return "isExport must be a Boolean"
    for optional in ("name", "webhookUrl"):
        if optional in body and not isinstance(body[optional], str):
            return f"{optional} must be a String"
    return None


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"success": false, "msg": "body is not JSON"}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"success": false, "msg": "body must be a JSON object"}',
            content_type="application/json",
        )
    return body


def _failure(status: int, message: str) -> web.Response:
    return web.json_response({"success": False, "msg": message}, status=status)


# --- samples ------------------------------------------------------------------------------


def _background() -> dict[str, Any]:
    return {
        "id": "background",
        "type": "background",
        "source_type": "image",
        "source_url": "/images/background/bg_blue_gradient.png",
        "source_color": "rgb(54,188,37)",
    }


def _avatar(model_id: str = "M000045058", cloth_id: str = "BG00002320") -> dict[str, Any]:
    return {
        "id": f"aiModel-{model_id}",
        "type": "aiModel",
        "layer": 1,
        "left": 630.0,
        "top": 146.0,
        "width": 679,
        "height": 2229,
        "scaleX": 1,
        "scaleY": 1,
        "model": {"ai_name": model_id, "emotion": cloth_id, "language": "en"},
    }


def _script(
    text: str, model_id: str = "M000045058", cloth_id: str = "BG00002320"
) -> dict[str, Any]:
    return {"org": text, "isTTS": False, "tts": None, "modelId": model_id, "clothId": cloth_id}


def _text(clip_id: str, tag: str | None, text: str, layer: int) -> dict[str, Any]:
    clip: dict[str, Any] = {
        "id": clip_id,
        "type": "textImage",
        "layer": layer,
        "left": 80.0,
        "top": 60.0,
        "width": 900,
        "height": 120,
        "scaleX": 1,
        "scaleY": 1,
        "text": text,
        "fontSize": 36,
        "fill": "rgb(255,255,255)",
    }
    if tag is not None:
        clip["tag"] = tag
    return clip


def sample_saved_project() -> dict[str, Any]:
    """The tutorial's parrot project: tagged image and text, and a two-avatar conversation."""
    return {
        "name": "Parrot facts",
        "orientation": "landscape",
        "scenes": [
            {
                "sceneIdx": 0,
                "background": _background(),
                "clips": [
                    _avatar(),
                    {
                        "id": "image-parrot",
                        "type": "image",
                        "tag": "parrot-image",
                        "layer": 2,
                        "left": 200.0,
                        "top": 120.0,
                        "width": 2333,
                        "height": 3500,
                        "scaleX": 0.15,
                        "scaleY": 0.15,
                        "source_url": "https://cdn-studio.aistudios.com/images/parrot.jpg",
                    },
                    _text("text-parrot", "parrot-text", "Parrots can talk.", 3),
                    _text("text-title-1", "title", "Parrot facts", 4),
                ],
                "scripts": [_script("Did you know parrots can talk?")],
            },
            {
                "sceneIdx": 1,
                "background": _background(),
                "clips": [
                    _avatar(),
                    _avatar("M000004017", "BG00006160"),
                    _text("text-title-2", "title", "Ask an expert", 2),
                    _text("text-footer", None, "studiohook sample", 3),
                ],
                "scripts": [
                    _script("What do parrots eat?"),
                    _script("Seeds, fruit and nuts.", "M000004017", "BG00006160"),
                ],
            },
        ],
    }


def sample_server_template() -> dict[str, Any]:
    """A server-side template: two scenes, three `title` clips, one `subtitles` clip."""
    saved = sample_saved_project()
    scenes = saved["scenes"]
    scenes[0]["clips"][2] = _text("text-subtitles", "subtitles", "Subtitles here", 3)
    scenes[1]["clips"][3] = _text("text-title-3", "title", "Third title", 3)
    scenes[1]["scripts"] = [_script("Second scene script.")]
    return {"name": "Promo template", "orientation": "landscape", "scenes": scenes}
