"""Saved v3 projects and server-side templates: the simulator over raw HTTP, the client
against the simulator, and the client against an independent server written from the pages."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from service.aistudios.client import AIStudiosClient
from service.aistudios.errors import AmbiguousError, PermanentError, RetryableError
from service.aistudios.simulator import SimulatorKnobs
from service.aistudios.simulator_v3 import (
    SAMPLE_PROJECT_ID,
    SAMPLE_TEMPLATE_ID,
    sample_saved_project,
    sample_server_template,
    save_v3_project,
)
from tests.support.aistudios_fixtures import running_simulator
from tests.support.fakes import FakeClock
from tests.support.loopback import tiny_server

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "any-key", "Content-Type": "application/json"}
V3 = "/api/odin/v3"


async def call(http, method, url, body=None):
    data = None if body is None else orjson.dumps(body)
    async with http.request(method, url, data=data, headers=AUTH) as response:
        return response.status, orjson.loads(await response.read())


def texts(scenes) -> list[list[str | None]]:
    return [[clip.get("text") for clip in scene["clips"]] for scene in scenes]


# --- the simulator over raw HTTP ----------------------------------------------------------


async def test_a_saved_project_is_returned_whole_with_tags_and_scripts(simulator):
    async with aiohttp.ClientSession() as http:
        status, got = await call(
            http, "GET", f"{simulator.base_url}{V3}/editor/project/{SAMPLE_PROJECT_ID}"
        )
    assert status == 200
    project = got["data"]["project"]
    assert project["_id"] == SAMPLE_PROJECT_ID
    assert project["state"] == "draft"
    assert project["creditSubstracted"] is False
    assert project["scenes"] == sample_saved_project()["scenes"]
    tags = [clip.get("tag") for clip in project["scenes"][0]["clips"]]
    assert tags == [None, "parrot-image", "parrot-text", "title"]
    assert [s["org"] for s in project["scenes"][1]["scripts"]] == [
        "What do parrots eat?",
        "Seeds, fruit and nuts.",
    ]
    assert simulator.export_count == 0


async def test_template_modify_without_is_export_creates_a_project_and_bills_nothing():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=1), clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        status, created = await call(
            http,
            "POST",
            f"{sim.base_url}{V3}/template/modify",
            {"templateId": SAMPLE_TEMPLATE_ID, "updates": {"title": "Draft"}},
        )
        assert status == 200
        project_id = created["data"]["projectId"]
        clock.advance(5)
        _, progress = await call(http, "GET", f"{sim.base_url}{V3}/editor/progress/{project_id}")
        _, listed = await call(http, "GET", f"{sim.base_url}{V3}/editor/project")
    assert sim.export_count == 0
    assert progress["data"]["progress"] == 0
    assert "downloadUrl" not in progress["data"]
    assert project_id not in {entry["id"] for entry in listed["data"]}
    assert sim.projects[project_id].scenes[0]["clips"][3]["text"] == "Draft"


async def test_template_modify_with_is_export_applies_each_key_to_its_clip_and_bills_once():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=2), clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        updates = {
            "title": "First",
            "title_2": "Third",
            "subtitles": "Sub",
            "scripts": "Scene one says this.",
            "scripts_1": "Scene two says that.",
        }
        status, created = await call(
            http,
            "POST",
            f"{sim.base_url}{V3}/template/modify",
            {
                "templateId": SAMPLE_TEMPLATE_ID,
                "name": "promo #1",
                "updates": updates,
                "isExport": True,
            },
        )
        assert status == 200
        project = sim.projects[created["data"]["projectId"]]
        clock.advance(2)
        _, progress = await call(http, "GET", f"{sim.base_url}{V3}/editor/progress/{project.id}")
    template = sample_server_template()["scenes"]
    assert sim.export_count == 1
    assert project.name == "promo #1"
    assert progress["data"]["progress"] == 100
    assert texts(project.scenes) == [
        [None, None, "Sub", "First"],
        [None, None, "Ask an expert", "Third"],
    ]
    assert texts(template)[1][2] == "Ask an expert"  # title_1 not sent: untouched
    assert [s["org"] for s in project.scenes[0]["scripts"]] == ["Scene one says this."]
    assert [s["org"] for s in project.scenes[1]["scripts"]] == ["Scene two says that."]
    for scene, original in zip(project.scenes, template, strict=True):
        for clip, before in zip(scene["clips"], original["clips"], strict=True):
            assert {k: v for k, v in clip.items() if k != "text"} == {
                k: v for k, v in before.items() if k != "text"
            }


@pytest.mark.parametrize(
    ("updates", "reason"),
    [
        ({"subtitle": "x"}, "is not an updates key"),
        ({"image": "x"}, "is not an updates key"),
        ({"title_3": "x"}, "'title_3' addresses clip 4 tagged 'title', but the template has 3"),
        ({"subtitles_1": "x"}, "addresses clip 2 tagged 'subtitles'"),
        ({"scripts_2": "x"}, "'scripts_2' addresses scene 3, but the template has 2"),
        ({"title": 5}, "updates.title must be a string"),
    ],
)
async def test_template_modify_refuses_keys_the_template_cannot_take(simulator, updates, reason):
    async with aiohttp.ClientSession() as http:
        status, answer = await call(
            http,
            "POST",
            f"{simulator.base_url}{V3}/template/modify",
            {"templateId": SAMPLE_TEMPLATE_ID, "updates": updates, "isExport": True},
        )
    assert status == 400
    assert answer["success"] is False
    assert reason in answer["msg"]
    assert simulator.export_count == 0


async def test_project_modify_changes_the_project_in_place(simulator):
    save_v3_project(simulator, "mine", sample_saved_project())
    async with aiohttp.ClientSession() as http:
        status, answer = await call(
            http,
            "POST",
            f"{simulator.base_url}{V3}/project/modify",
            {"projectId": "mine", "updates": {"title_1": "Changed"}},
        )
    assert (status, answer["data"]["projectId"]) == (200, "mine")
    assert texts(simulator.saved_v3_projects["mine"].scenes)[1][2] == "Changed"
    assert simulator.export_count == 0


# --- the client against the simulator ----------------------------------------------------


async def test_client_fetches_a_saved_project_as_a_template(aistudios_client):
    template = await aistudios_client.fetch_saved_project_v3(SAMPLE_PROJECT_ID)
    assert template == sample_saved_project()


async def test_client_template_modify_always_sends_is_export_true(aistudios_client, simulator):
    project_id = await aistudios_client.template_modify(
        SAMPLE_TEMPLATE_ID, {"title": "Hello"}, name="job #1", webhook_url="http://127.0.0.1:9/cb"
    )
    assert simulator.modify_requests == [
        {
            "templateId": SAMPLE_TEMPLATE_ID,
            "updates": {"title": "Hello"},
            "isExport": True,
            "name": "job #1",
            "webhookUrl": "http://127.0.0.1:9/cb",
        }
    ]
    assert simulator.export_count == 1
    assert simulator.exports_named("job #1")[0].id == project_id


async def test_client_project_modify_sends_is_export_true(aistudios_client, simulator):
    save_v3_project(simulator, "mine", sample_saved_project())
    assert await aistudios_client.project_modify("mine", {"scripts": "Hi"}) == "mine"
    assert simulator.modify_requests[-1]["isExport"] is True
    assert simulator.export_count == 1
    assert simulator.projects["mine"].scenes[0]["scripts"][0]["org"] == "Hi"
    assert (await aistudios_client.progress_v3("mine")).progress >= 0


async def test_a_refused_updates_key_is_permanent_and_bills_nothing(aistudios_client, simulator):
    with pytest.raises(PermanentError, match="title_9"):
        await aistudios_client.template_modify(SAMPLE_TEMPLATE_ID, {"title_9": "x"}, name="n")
    assert simulator.export_count == 0


async def test_a_lost_template_modify_response_is_ambiguous_and_found_by_name(
    aistudios_client, simulator
):
    simulator.knobs.lose_response_next_exports = 1
    with pytest.raises(AmbiguousError):
        await aistudios_client.template_modify(SAMPLE_TEMPLATE_ID, {"title": "x"}, name="lost #7")
    (created,) = simulator.exports_named("lost #7")
    found = await aistudios_client.find_project_by_name("lost #7")
    assert found is not None
    assert found.id == created.id


async def test_a_5xx_on_template_modify_is_ambiguous(aistudios_client, simulator):
    simulator.knobs.fail_5xx_next = 1
    with pytest.raises(AmbiguousError):
        await aistudios_client.template_modify(SAMPLE_TEMPLATE_ID, {"title": "x"}, name="5xx #1")
    assert len(simulator.exports_named("5xx #1")) == 1


async def test_fetching_a_missing_saved_project_is_permanent(aistudios_client):
    with pytest.raises(PermanentError, match="not found"):
        await aistudios_client.fetch_saved_project_v3("nope")


# --- the client against an independent server written from the pages ----------------------


class PagesServer:
    """Answers as more-ways-to-make-a-video.md and get-project.md describe, nothing more."""

    def __init__(self, *, top_level: bool = False) -> None:
        self.top_level = top_level
        self.received: list[tuple[str, str, dict | None]] = []

    def envelope(self, data: dict) -> web.Response:
        body = {"success": True, **data} if self.top_level else {"success": True, "data": data}
        return web.json_response(body)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.received.append((request.method, request.path, body))
        if request.method == "GET" and request.path == f"{V3}/editor/project/p-saved":
            project = {
                "_id": "p-saved",
                "name": "Saved",
                "orientation": "portrait",
                "scenes": [{"clips": [{"type": "image", "tag": "hero", "source_url": "u"}]}],
                "userId": "u1",
                "templateId": None,
                "state": "draft",
                "progress": 0,
                "creditSubstracted": False,
                "download_url": None,
            }
            return self.envelope({"project": project})
        if request.method == "POST" and request.path in {
            f"{V3}/template/modify",
            f"{V3}/project/modify",
        }:
            return self.envelope({"projectId": "p-new"})
        return web.json_response({"success": False, "msg": "unknown"}, status=404)


@pytest.mark.parametrize("top_level", [False, True])
async def test_client_against_an_independent_server(top_level):
    server = PagesServer(top_level=top_level)
    async with (
        tiny_server(server.handle) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        template = await client.fetch_saved_project_v3("p-saved")
        created = await client.template_modify("tpl-1", {"title": "T", "scripts_1": "S"}, name="n")
        modified = await client.project_modify("p-saved", {"subtitles": "x"})
    assert template == {
        "name": "Saved",
        "orientation": "portrait",
        "scenes": [{"clips": [{"type": "image", "tag": "hero", "source_url": "u"}]}],
    }
    assert (created, modified) == ("p-new", "p-new")
    assert server.received[1:] == [
        (
            "POST",
            f"{V3}/template/modify",
            {
                "templateId": "tpl-1",
                "updates": {"title": "T", "scripts_1": "S"},
                "isExport": True,
                "name": "n",
            },
        ),
        (
            "POST",
            f"{V3}/project/modify",
            {"projectId": "p-saved", "updates": {"subtitles": "x"}, "isExport": True},
        ),
    ]


async def test_a_saved_project_answer_without_scenes_is_refused():
    async def handler(_):
        return web.json_response({"success": True, "data": {"project": {"name": "x"}}})

    async with (
        tiny_server(handler) as url,
        client_for_url(url) as client,
    ):
        with pytest.raises(RetryableError, match=r"project\.scenes missing"):
            await client.fetch_saved_project_v3("p")


def client_for_url(url: str) -> AIStudiosClient:
    return AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k")
