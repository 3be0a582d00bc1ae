"""The simulator over raw HTTP: shapes from the reference pages, knobs, callbacks, control API."""

from __future__ import annotations

import asyncio

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from service.aistudios.simulator import Simulator, SimulatorKnobs, run_simulator
from tests.support.aistudios_fixtures import running_simulator, v3_body
from tests.support.fakes import FakeClock
from tests.support.loopback import tiny_server

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "any-key", "Content-Type": "application/json"}
# Field tables of the reference pages (aistudios-api/v3 and legacy).
V3_LIST_ENTRY_FIELDS = {"id", "name", "state", "download_url"}
V3_PROJECT_FIELDS = {
    "_id", "name", "orientation", "scenes", "userId", "templateId", "state", "thumbnailUrl",
    "baseInfoId", "dictionary", "backendTaskId", "exportType", "progress", "creditSubstracted",
    "createdAt", "updatedAt", "download_url",
}  # fmt: skip
WEBHOOK_FIELDS = {"progress", "credit", "backendTaskId", "download_url"}
LEGACY_SCENE = {"AIModel": {"model": "M", "clothes": "C", "script": "hi"}, "clips": []}


async def call(http, method, url, body=None, headers=AUTH):
    data = None if body is None else orjson.dumps(body)
    async with http.request(method, url, data=data, headers=headers) as response:
        return response.status, response.headers, orjson.loads(await response.read())


async def test_v3_export_progress_list_and_project_shapes():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=8), clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        base = f"{sim.base_url}/api/odin/v3"
        status, _, created = await call(
            http, "POST", f"{base}/editor/project", {**v3_body(), "name": "shape"}
        )
        assert status == 200
        assert created["success"] is True
        project_id = created["data"]["projectId"]
        assert isinstance(project_id, str)

        clock.advance(2)
        _, _, running = await call(http, "GET", f"{base}/editor/progress/{project_id}")
        assert running["data"]["progress"] == 25.0
        assert isinstance(running["data"]["progress"], float)
        assert "downloadUrl" not in running["data"]

        _, _, listed = await call(http, "GET", f"{base}/editor/project")
        assert [set(entry) for entry in listed["data"]] == [V3_LIST_ENTRY_FIELDS]
        assert listed["data"][0]["state"] == "exporting"

        clock.advance(6)
        _, _, done = await call(http, "GET", f"{base}/editor/progress/{project_id}")
        assert done["data"]["progress"] == 100.0
        assert done["data"]["downloadUrl"].endswith(f"/_simulator/videos/{project_id}.mp4")

        _, _, listed = await call(http, "GET", f"{base}/editor/project")
        assert listed["data"][0]["state"] == "exported"
        assert listed["data"][0]["download_url"] == done["data"]["downloadUrl"]

        _, _, got = await call(http, "GET", f"{base}/editor/project/{project_id}")
        assert set(got["data"]["project"]) == V3_PROJECT_FIELDS
        assert got["data"]["project"]["progress"] == 100

        async with http.get(done["data"]["downloadUrl"]) as video:
            assert video.headers["Content-Type"] == "video/mp4"
            assert (await video.read())[4:8] == b"ftyp"
        async with http.get(f"{sim.base_url}/_simulator/videos/nope.mp4") as missing:
            assert missing.status == 404


async def test_legacy_shapes(simulator):
    async with aiohttp.ClientSession() as http:
        base = f"{simulator.base_url}/api/odin/editor"
        _, _, imported = await call(http, "GET", f"{base}/project/sample-project")
        assert set(imported["response"]) == {"projectName", "scenes"}
        assert "AIModel" in imported["response"]["scenes"][0]

        status, _, exported = await call(
            http, "POST", f"{base}/project", {"scenes": imported["response"]["scenes"]}
        )
        assert status == 200
        key = exported["data"]["key"]
        assert exported["data"]["cube_used"] >= 1

        _, _, progress = await call(http, "GET", f"{base}/progress/{key}")
        assert set(progress["data"]) <= {"progress", "videoUrl"}

        _, _, by_name = await call(http, "GET", f"{base}/project/name/Sample%20project")
        assert by_name["response"]["projectName"] == "Sample project"
        status, _, missing = await call(http, "GET", f"{base}/project/name/unknown")
        assert status == 404
        assert missing == {"success": False, "msg": "project not found"}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/odin/v3/editor/project", {"name": "x"}, "scenes is required"),
        ("/api/odin/v3/editor/project", {"scenes": [{"background": {}, "clips": []}]}, "sceneIdx"),
        ("/api/odin/v3/editor/project", {"scenes": [{"sceneIdx": 0, "clips": []}]}, "background"),
        ("/api/odin/v3/editor/project", {"scenes": [{"sceneIdx": 0, "background": {}}]}, "clips"),
        ("/api/odin/editor/project", {"scenes": [{"clips": []}]}, "AIModel"),
        ("/api/odin/editor/project", {"scenes": []}, "scenes is required"),
        ("/api/odin/v3/auth/token", {"appId": "a"}, "userKey"),
    ],
)
async def test_invalid_bodies_are_400_with_success_false(simulator, path, body, message):
    async with aiohttp.ClientSession() as http:
        status, _, answer = await call(http, "POST", simulator.base_url + path, body)
    assert status == 400
    assert answer["success"] is False
    assert message in answer["msg"]
    assert simulator.export_count == 0


async def test_non_json_body_is_400(simulator):
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{simulator.base_url}/api/odin/v3/editor/project", data=b"{nope", headers=AUTH
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["success"] is False


async def test_tokens_expire_by_the_clock_and_unknown_keys_are_refused():
    clock = FakeClock()
    knobs = SimulatorKnobs(token_ttl_s=60, api_keys=frozenset({"static"}))
    async with running_simulator(knobs, clock) as sim, aiohttp.ClientSession() as http:
        auth_url = f"{sim.base_url}/api/odin/v3/auth"
        _, _, issued = await call(
            http, "POST", f"{auth_url}/token", {"appId": "a", "userKey": "u"}, headers={}
        )
        token = issued["data"]["token"]
        headers = {"Authorization": token}
        assert (await call(http, "GET", auth_url, headers=headers))[2]["data"] == {
            "isAuthenticated": True
        }
        assert (await call(http, "GET", auth_url, headers={"Authorization": "static"}))[0] == 200
        assert (await call(http, "GET", auth_url, headers={"Authorization": "other"}))[0] == 401
        assert (await call(http, "GET", auth_url, headers={}))[0] == 401
        clock.advance(60)
        status, _, expired = await call(http, "GET", auth_url, headers=headers)
        assert status == 401
        assert expired["success"] is False


async def test_throttle_and_5xx_knobs_record_requests():
    clock = FakeClock(1000.0)
    knobs = SimulatorKnobs(throttle_next=1, retry_after_s=3, fail_5xx_next=1)
    async with running_simulator(knobs, clock) as sim, aiohttp.ClientSession() as http:
        url = f"{sim.base_url}/api/odin/v3/editor/project"
        status, headers, _ = await call(http, "GET", url)
        assert (status, headers["Retry-After"]) == (429, "3")
        clock.advance(1)
        assert (await call(http, "GET", url))[0] == 500
        clock.advance(1)
        assert (await call(http, "GET", url))[0] == 200
        async with http.get(f"{sim.base_url}/_simulator/state"):
            pass
        _, _, log = await call(http, "GET", f"{sim.base_url}/_simulator/requests")
    assert sim.requests == [
        (1000.0, "GET", "/api/odin/v3/editor/project"),
        (1001.0, "GET", "/api/odin/v3/editor/project"),
        (1002.0, "GET", "/api/odin/v3/editor/project"),
    ]
    assert sim.throttles == [(1000.0, 3.0)]
    assert log == {
        "requests": [[at, method, path] for at, method, path in sim.requests],
        "throttles": [[1000.0, 3.0]],
    }


async def test_a_failing_render_stalls_below_100():
    clock = FakeClock()
    knobs = SimulatorKnobs(render_seconds=10, failing_renders_next=1, stall_at=40)
    async with running_simulator(knobs, clock) as sim, aiohttp.ClientSession() as http:
        base = f"{sim.base_url}/api/odin/v3/editor"
        _, _, first = await call(http, "POST", f"{base}/project", v3_body())
        _, _, second = await call(http, "POST", f"{base}/project", v3_body())
        clock.advance(1000)
        _, _, stalled = await call(http, "GET", f"{base}/progress/{first['data']['projectId']}")
        _, _, fine = await call(http, "GET", f"{base}/progress/{second['data']['projectId']}")
    assert stalled["data"] == {"progress": 40.0, "state": "exporting"}
    assert fine["data"]["progress"] == 100.0


async def test_callback_is_posted_when_the_render_finishes():
    received: list[dict] = []
    arrived = anyio.Event()

    async def receiver(request):
        received.append(await request.json())
        arrived.set()
        return web.Response(status=204)

    async with (
        tiny_server(receiver) as hook_url,
        running_simulator(SimulatorKnobs(render_seconds=0.05)) as sim,
        aiohttp.ClientSession() as http,
    ):
        body = {**v3_body(), "webhookUrl": f"{hook_url}/cb/job-1"}
        _, _, created = await call(http, "POST", f"{sim.base_url}/api/odin/v3/editor/project", body)
        with anyio.fail_after(5):
            await arrived.wait()
    project = sim.projects[created["data"]["projectId"]]
    assert set(received[0]) == WEBHOOK_FIELDS
    assert received[0]["progress"] == 100
    assert received[0]["backendTaskId"] == project.backend_task_id
    assert received[0]["download_url"] == sim.download_url(project)
    assert sim.callbacks[0][2] == 204


def simulator_tasks():
    """Live tasks the simulator started: its callback supervisor and each pending callback."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done()
        and (task.get_name() == "simulator-callbacks" or "Simulator._call_back" in task.get_name())
    ]


async def test_stop_cancels_pending_callbacks():
    render_s = 0.2
    arrived = anyio.Event()

    async def receiver(_):
        arrived.set()
        return web.Response(status=204)

    async with tiny_server(receiver) as hook_url:
        sim = Simulator(SimulatorKnobs(render_seconds=render_s))
        await sim.start()
        try:
            async with aiohttp.ClientSession() as http:
                body = {**v3_body(), "webhookUrl": f"{hook_url}/cb/job-1"}
                await call(http, "POST", f"{sim.base_url}/api/odin/v3/editor/project", body)
            assert simulator_tasks(), "the render should have a pending callback"
        finally:
            with anyio.fail_after(5):
                await sim.stop()
        assert simulator_tasks() == []
        # A callback that survived stop() would arrive right after the render ends; waiting
        # several render lengths (returning early if one arrives) shows none is coming.
        with anyio.move_on_after(render_s * 5):
            await arrived.wait()
    assert not arrived.is_set()
    assert sim.callbacks == []


async def test_control_api_sets_knobs_and_reports_state(simulator):
    async with aiohttp.ClientSession() as http:
        knobs_url = f"{simulator.base_url}/_simulator/knobs"
        status, _, state = await call(
            http, "POST", knobs_url, {"lose_response_next_exports": 1, "render_seconds": 2}
        )
        assert status == 200
        assert state["knobs"]["lose_response_next_exports"] == 1
        assert simulator.knobs.render_seconds == 2.0

        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call(http, "POST", f"{simulator.base_url}/api/odin/v3/editor/project", v3_body())

        status, _, state = await call(http, "GET", f"{simulator.base_url}/_simulator/state")
        assert state["export_count"] == 1
        assert state["request_count"] == 1
        assert state["projects"][0]["api"] == "v3"

        assert (await call(http, "POST", knobs_url, {"warp_drive": 1}))[0] == 400
        assert (await call(http, "POST", knobs_url, {"throttle_next": "2"}))[0] == 400
        assert (await call(http, "POST", knobs_url, {"api_keys": ["k1"]}))[0] == 200
    assert simulator.knobs.api_keys == frozenset({"k1"})


async def test_control_api_switches_the_strict_project_list():
    async with (
        running_simulator(SimulatorKnobs(render_seconds=8), FakeClock()) as sim,
        aiohttp.ClientSession() as http,
    ):
        knobs_url = f"{sim.base_url}/_simulator/knobs"
        list_url = f"{sim.base_url}/api/odin/v3/editor/project"
        await call(http, "POST", list_url, v3_body())
        assert len((await call(http, "GET", list_url))[2]["data"]) == 1

        status, _, state = await call(http, "POST", knobs_url, {"list_only_exported": True})
        assert status == 200
        assert state["knobs"]["list_only_exported"] is True
        assert (await call(http, "GET", list_url))[2]["data"] == []

        assert (await call(http, "POST", knobs_url, {"list_only_exported": 1}))[0] == 400
        assert (await call(http, "POST", knobs_url, {"list_only_exported": False}))[0] == 200
        assert len((await call(http, "GET", list_url))[2]["data"]) == 1


async def test_held_renders_finish_only_once_released():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=2), clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        knobs_url = f"{sim.base_url}/_simulator/knobs"
        base = f"{sim.base_url}/api/odin/v3"
        assert (await call(http, "POST", knobs_url, {"hold_renders": True}))[0] == 200
        project_id = (await call(http, "POST", f"{base}/editor/project", v3_body()))[2]["data"][
            "projectId"
        ]
        clock.advance(10)  # five render lengths: done, were it not held
        _, _, held = await call(http, "GET", f"{base}/editor/progress/{project_id}")
        assert held["data"] == {"progress": 99.0, "state": "exporting"}
        _, _, listed = await call(http, "GET", f"{base}/editor/project")
        assert listed["data"][0]["state"] == "exporting"
        assert listed["data"][0]["download_url"] is None

        assert (await call(http, "POST", knobs_url, {"hold_renders": False}))[0] == 200
        _, _, done = await call(http, "GET", f"{base}/editor/progress/{project_id}")
        assert done["data"]["progress"] == 100.0
        assert done["data"]["state"] == "exported"
        assert "downloadUrl" in done["data"]


async def test_5xx_on_a_create_still_creates_the_project(simulator):
    simulator.knobs.fail_5xx_next = 1
    async with aiohttp.ClientSession() as http:
        status, _, _ = await call(
            http,
            "POST",
            f"{simulator.base_url}/api/odin/editor/project",
            {"scenes": [LEGACY_SCENE]},
        )
    assert status == 500
    assert simulator.export_count == 1


async def test_run_simulator_serves_until_shutdown():
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        base_url = await tg.start(
            run_simulator, "127.0.0.1", 0, SimulatorKnobs(render_seconds=1), shutdown
        )
        async with aiohttp.ClientSession() as http:
            _, _, state = await call(http, "GET", f"{base_url}/_simulator/state")
        assert state["base_url"] == base_url
        shutdown.set()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(http, "GET", f"{base_url}/_simulator/state")


async def test_a_draft_is_not_billed_and_each_export_of_it_is():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=4), clock) as sim,
        aiohttp.ClientSession() as http,
    ):
        base = f"{sim.base_url}/api/odin/v3"
        body = {**v3_body(), "name": "two-step", "isExport": False}
        body["scenes"][0]["clips"] = [{"id": "t1", "type": "textImage", "tag": "title"}]
        _, _, created = await call(http, "POST", f"{base}/editor/project", body)
        project_id = created["data"]["projectId"]
        _, _, draft = await call(http, "GET", f"{base}/editor/project/{project_id}")
        project = draft["data"]["project"]
        assert set(project) == V3_PROJECT_FIELDS
        assert project["name"] == "two-step"
        assert project["scenes"][0]["clips"][0]["tag"] == "title"
        assert project["scenes"][0]["scripts"] == body["scenes"][0]["scripts"]
        assert project["creditSubstracted"] is False
        assert project["backendTaskId"] is None
        assert project["progress"] == 0
        assert sim.export_count == 0

        _, _, exported = await call(
            http, "POST", f"{base}/editor/project/export", {"projectId": project_id}
        )
        assert exported["data"]["projectId"] == project_id
        clock.advance(1)
        _, _, running = await call(http, "GET", f"{base}/editor/project/{project_id}")
        assert running["data"]["project"]["creditSubstracted"] is True
        assert running["data"]["project"]["backendTaskId"]
        assert running["data"]["project"]["progress"] == 25
        assert sim.export_count == 1

        await call(http, "POST", f"{base}/editor/project/export", {"projectId": project_id})
        assert sim.billed_exports(project_id) == 2
        assert sim.billed_by_name() == {"two-step": 2}
        state = await call(http, "GET", f"{sim.base_url}/_simulator/state")
        assert state[2]["billed_by_name"] == {"two-step": 2}


async def test_lost_responses_on_drafts_and_on_exports_are_separate_knobs(simulator):
    simulator.knobs.lose_response_next_drafts = 1
    async with aiohttp.ClientSession() as http:
        base = f"{simulator.base_url}/api/odin/v3"
        with pytest.raises(aiohttp.ClientError):
            await call(http, "POST", f"{base}/editor/project", {**v3_body(), "isExport": False})
        [draft] = simulator.projects.values()
        assert draft.exports == 0
        simulator.knobs.lose_response_next_exports = 1
        with pytest.raises(aiohttp.ClientError):
            await call(http, "POST", f"{base}/editor/project/export", {"projectId": draft.id})
        assert simulator.billed_exports(draft.id) == 1
