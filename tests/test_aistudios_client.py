"""The AI Studios client against the simulator and against independent loopback servers."""

from __future__ import annotations

import socket

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from service.aistudios.client import AIStudiosClient, Progress
from service.aistudios.errors import AmbiguousError, AuthError, PermanentError, RetryableError
from service.aistudios.simulator import TOKEN_PATH, SimulatorKnobs
from tests.support.aistudios_fixtures import (
    client_for,
    running_simulator,
    v3_body,
)
from tests.support.fakes import FakeClock
from tests.support.loopback import tiny_server

pytestmark = pytest.mark.anyio

TTL_S = 1000.0


def token_requests(simulator) -> int:
    return sum(1 for _, _, path in simulator.requests if path == TOKEN_PATH)


def json_response(body, status=200, headers=None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


# --- the happy paths, v3 -----------------------------------------------------------------


async def test_export_v3_renders_to_a_downloadable_mp4():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=10), clock) as sim,
        client_for(sim) as client,
    ):
        project_id = await client.export_v3(
            v3_body(), name="job-1", webhook_url="http://127.0.0.1:9/cb"
        )
        assert sim.projects[project_id].name == "job-1"
        assert sim.projects[project_id].webhook_url == "http://127.0.0.1:9/cb"
        assert sim.export_count == 1

        clock.advance(5)
        half = await client.progress_v3(project_id)
        assert half == Progress(progress=50.0, download_url=None)
        assert not half.done

        clock.advance(5)
        done = await client.progress_v3(project_id)
        assert done.done
        assert done.progress == 100.0
        assert done.download_url is not None
        async with aiohttp.ClientSession() as http, http.get(done.download_url) as video:
            assert video.status == 200
            assert video.content_type == "video/mp4"
            data = await video.read()
        assert data[4:8] == b"ftyp"


async def test_list_and_find_project(aistudios_client, simulator):
    first = await aistudios_client.export_v3(v3_body(), name="alpha")
    second = await aistudios_client.export_v3(v3_body(2), name="beta")

    listed = {p.id: p for p in await aistudios_client.list_projects_v3()}
    assert set(listed) == {first, second}
    assert listed[first].name == "alpha"
    assert listed[first].state in {"exporting", "exported"}

    found = await aistudios_client.find_project_by_name("beta")
    assert found is not None
    assert found.id == second
    assert await aistudios_client.find_project_by_name("gamma") is None


async def test_find_project_by_name_prefers_the_finished_one():
    async def handler(_):
        return json_response(
            {
                "success": True,
                "data": [
                    {"id": "a", "name": "n", "state": "exporting", "download_url": None},
                    {"id": "b", "name": "n", "state": "exported", "download_url": "http://v/b"},
                ],
            }
        )

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        found = await client.find_project_by_name("n")
    assert found is not None
    assert found.id == "b"


async def test_confirm_auth(simulator):
    async with client_for(simulator) as client:
        assert await client.confirm_auth() is True
    simulator.knobs.api_keys = frozenset({"the-real-key"})
    async with client_for(simulator, api_key="a-wrong-key") as client:
        assert await client.confirm_auth() is False


# --- legacy ------------------------------------------------------------------------------


async def test_legacy_import_change_export_and_progress():
    clock = FakeClock()
    async with (
        running_simulator(SimulatorKnobs(render_seconds=4), clock) as sim,
        client_for(sim) as client,
    ):
        saved = await client.import_project_legacy("sample-project")
        assert saved["projectName"] == "Sample project"
        scenes = saved["scenes"]
        scenes[0]["AIModel"]["script"] = "A new script"

        key = await client.export_legacy(scenes)
        assert sim.projects[key].scenes[0]["AIModel"]["script"] == "A new script"
        assert sim.export_count == 1

        clock.advance(1)
        assert (await client.progress_legacy(key)).progress == 25.0
        clock.advance(3)
        done = await client.progress_legacy(key)
        assert done.done
        assert done.download_url == sim.download_url(sim.projects[key])


# --- auth --------------------------------------------------------------------------------


async def test_token_is_issued_then_refreshed_before_expiry():
    client_clock, sim_clock = FakeClock(), FakeClock()
    calls: list[tuple[str, str]] = []
    knobs = SimulatorKnobs(render_seconds=1, token_ttl_s=TTL_S)
    async with (
        running_simulator(knobs, sim_clock) as sim,
        client_for(
            sim,
            app_id="app",
            user_key="user-key",
            token_ttl_s=TTL_S,
            clock=client_clock,
            on_call=lambda endpoint, outcome: calls.append((endpoint, outcome)),
        ) as client,
    ):
        await client.list_projects_v3()
        await client.list_projects_v3()
        assert token_requests(sim) == 1

        client_clock.advance(TTL_S * 0.9 + 1)
        sim_clock.advance(TTL_S * 0.9 + 1)
        await client.list_projects_v3()
    assert token_requests(sim) == 2
    assert ("v3.list", "auth") not in calls
    assert calls == [
        ("auth.token", "ok"),
        ("v3.list", "ok"),
        ("v3.list", "ok"),
        ("auth.token", "ok"),
        ("v3.list", "ok"),
    ]


async def test_a_401_refreshes_the_token_once_and_retries():
    client_clock, sim_clock = FakeClock(), FakeClock()
    calls: list[tuple[str, str]] = []
    async with (
        running_simulator(SimulatorKnobs(token_ttl_s=TTL_S), sim_clock) as sim,
        client_for(
            sim,
            app_id="app",
            user_key="user-key",
            token_ttl_s=TTL_S,
            clock=client_clock,
            on_call=lambda endpoint, outcome: calls.append((endpoint, outcome)),
        ) as client,
    ):
        await client.confirm_auth()
        sim_clock.advance(TTL_S + 1)  # the server expired the token early
        project_id = await client.export_v3(v3_body(), name="after-401")
    assert sim.projects[project_id].name == "after-401"
    assert sim.export_count == 1
    assert calls == [
        ("auth.token", "ok"),
        ("v3.auth", "ok"),
        ("v3.export", "auth"),
        ("auth.token", "ok"),
        ("v3.export", "ok"),
    ]


async def test_a_second_401_is_an_auth_error():
    knobs = SimulatorKnobs(token_ttl_s=0)  # every token is expired on arrival
    async with running_simulator(knobs) as sim, client_for(sim, app_id="a", user_key="u") as client:
        with pytest.raises(AuthError):
            await client.list_projects_v3()
    assert token_requests(sim) == 2
    assert len(sim.requests) == 4


async def test_a_refused_static_key_is_not_retried():
    async with (
        running_simulator(SimulatorKnobs(api_keys=frozenset({"good"}))) as sim,
        client_for(sim, api_key="bad") as client,
    ):
        with pytest.raises(AuthError) as caught:
            await client.export_v3(v3_body(), name="x")
    assert caught.value.status == 401
    assert len(sim.requests) == 1
    assert sim.export_count == 0


async def test_wrong_app_credentials_are_an_auth_error():
    knobs = SimulatorKnobs(app_credentials={"app": "right"})
    async with running_simulator(knobs) as sim:
        async with client_for(sim, app_id="app", user_key="wrong") as client:
            with pytest.raises(AuthError):
                await client.list_projects_v3()
        async with client_for(sim, app_id="app", user_key="right") as client:
            assert await client.list_projects_v3() == []


async def test_concurrent_callers_share_one_token_refresh(simulator):
    async with (
        client_for(simulator, app_id="app", user_key="k") as client,
        anyio.create_task_group() as tg,
    ):
        for _ in range(8):
            tg.start_soon(client.list_projects_v3)
    assert token_requests(simulator) == 1


async def test_before_request_is_awaited_before_every_request(simulator):
    seen: list[str] = []

    async def before(endpoint: str) -> None:
        seen.append(endpoint)

    async with client_for(simulator, app_id="a", user_key="u", before_request=before) as client:
        project_id = await client.export_v3(v3_body(), name="n")
        await client.progress_v3(project_id)
    assert seen == ["auth.token", "v3.export", "v3.progress"]
    assert len(seen) == len(simulator.requests)


async def test_headers_are_the_raw_token_and_json():
    seen: list[tuple[str | None, str | None]] = []

    async def handler(request):
        seen.append((request.headers.get("Authorization"), request.headers.get("Content-Type")))
        return json_response({"success": True, "data": {"isAuthenticated": True}})

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="raw-token") as client,
    ):
        assert await client.confirm_auth()
    assert seen == [("raw-token", "application/json")]


# --- error classes -----------------------------------------------------------------------


async def test_429_is_retryable_with_the_servers_retry_after(aistudios_client, simulator):
    simulator.knobs.throttle_next = 2
    simulator.knobs.retry_after_s = 2.5
    with pytest.raises(RetryableError) as on_read:
        await aistudios_client.list_projects_v3()
    with pytest.raises(RetryableError) as on_create:
        await aistudios_client.export_v3(v3_body(), name="throttled")
    assert on_read.value.retry_after_s == 2.5
    assert on_create.value.status == 429
    assert simulator.export_count == 0


async def test_5xx_on_a_read_is_retryable(aistudios_client, simulator):
    simulator.knobs.fail_5xx_next = 1
    with pytest.raises(RetryableError) as caught:
        await aistudios_client.list_projects_v3()
    assert caught.value.status == 500


async def test_5xx_on_a_create_is_ambiguous_and_the_project_exists(aistudios_client, simulator):
    simulator.knobs.fail_5xx_next = 2
    with pytest.raises(AmbiguousError):
        await aistudios_client.export_v3(v3_body(), name="maybe-v3")
    with pytest.raises(AmbiguousError):
        await aistudios_client.export_legacy([{"AIModel": {"model": "M"}, "clips": []}])
    assert len(simulator.exports_named("maybe-v3")) == 1
    assert simulator.export_count == 2


async def test_a_lost_create_response_is_ambiguous_and_reconcilable(aistudios_client, simulator):
    simulator.knobs.lose_response_next_exports = 1
    with pytest.raises(AmbiguousError):
        await aistudios_client.export_v3(v3_body(), name="lost-one")
    assert len(simulator.exports_named("lost-one")) == 1
    found = await aistudios_client.find_project_by_name("lost-one")
    assert found is not None
    assert found.id == simulator.exports_named("lost-one")[0].id


async def test_a_lost_legacy_create_response_is_ambiguous(aistudios_client, simulator):
    simulator.knobs.lose_response_next_exports = 1
    with pytest.raises(AmbiguousError):
        await aistudios_client.export_legacy([{"AIModel": {"model": "M"}, "clips": []}])
    assert simulator.export_count == 1


async def test_connection_refused_is_retryable_even_for_a_create():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client:
        with pytest.raises(RetryableError):
            await client.export_v3(v3_body(), name="x")
        with pytest.raises(RetryableError):
            await client.progress_legacy("k")


async def test_a_read_timeout_is_ambiguous_on_a_create_and_retryable_on_a_read():
    release = anyio.Event()

    async def handler(_):
        await release.wait()
        return json_response({})

    async with tiny_server(handler) as url:
        try:
            async with AIStudiosClient(
                base_url=url, legacy_base_url=url, api_key="k", request_timeout_s=0.2
            ) as client:
                with pytest.raises(AmbiguousError):
                    await client.export_v3(v3_body(), name="slow")
                with pytest.raises(RetryableError):
                    await client.progress_v3("p")
        finally:
            release.set()


async def test_success_false_is_permanent_with_its_message(aistudios_client, simulator):
    with pytest.raises(PermanentError) as caught:
        await aistudios_client.export_v3({"scenes": [{"sceneIdx": 0, "clips": []}]}, name="bad")
    assert "background" in caught.value.message
    assert caught.value.status == 400
    assert simulator.export_count == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"success": False, "msg": "quota exceeded"}, "quota exceeded"),
        ({"success": False, "message": "no such model"}, "no such model"),
        ({"success": False, "error": {"code": 1, "msg": "bad scene"}}, "bad scene"),
        ({"success": False, "error": "plain"}, "plain"),
    ],
)
async def test_success_false_on_200_is_permanent(body, message):
    async def handler(_):
        return json_response(body)

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        with pytest.raises(PermanentError) as caught:
            await client.export_v3(v3_body(), name="x")
    assert caught.value.message == message
    assert not isinstance(caught.value, AuthError)


async def test_an_unreadable_body_is_ambiguous_on_a_create_and_retryable_on_a_read():
    async def handler(_):
        return web.Response(text="<html>gateway</html>", content_type="text/html")

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        with pytest.raises(AmbiguousError):
            await client.export_legacy([{"AIModel": {}}])
        with pytest.raises(RetryableError):
            await client.progress_v3("p")


async def test_other_4xx_is_permanent(aistudios_client):
    with pytest.raises(PermanentError) as caught:
        await aistudios_client.progress_v3("no-such-project")
    assert caught.value.status == 404
    assert caught.value.message == "project not found"


async def test_on_call_reports_each_outcome(simulator):
    calls: list[tuple[str, str]] = []
    async with client_for(simulator, on_call=lambda e, o: calls.append((e, o))) as client:
        simulator.knobs.throttle_next = 1
        with pytest.raises(RetryableError):
            await client.list_projects_v3()
        simulator.knobs.lose_response_next_exports = 1
        with pytest.raises(AmbiguousError):
            await client.export_v3(v3_body(), name="n")
        with pytest.raises(PermanentError):
            await client.progress_v3("missing")
        await client.list_projects_v3()
    assert calls == [
        ("v3.list", "retryable"),
        ("v3.export", "ambiguous"),
        ("v3.progress", "permanent"),
        ("v3.list", "ok"),
    ]


async def test_client_needs_credentials():
    with pytest.raises(ValueError, match="api_key"):
        AIStudiosClient(base_url="http://x", legacy_base_url="http://x")


# --- every documented response variant, from a server that is not the simulator -----------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"success": True, "data": {"progress": "42.50"}}, Progress(42.5, None)),
        ({"success": True, "data": {"progress": 63.2}}, Progress(63.2, None)),
        ({"success": True, "data": {"progress": 100, "downloadUrl": "u1"}}, Progress(100.0, "u1")),
        ({"success": True, "data": {"progress": 100, "download_url": "u2"}}, Progress(100.0, "u2")),
        ({"success": True, "data": {"progress": "100", "videoUrl": "u3"}}, Progress(100.0, "u3")),
        ({"success": True, "data": {"progress": 100.0, "url": "u4"}}, Progress(100.0, "u4")),
        ({"progress": 100, "downloadUrl": "u5"}, Progress(100.0, "u5")),
        ({"success": True, "progress": "7.5"}, Progress(7.5, None)),
        ({"success": True, "data": {"progress": 100}}, Progress(100.0, None)),
    ],
)
async def test_progress_variants(body, expected):
    async def handler(_):
        return json_response(body)

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        assert await client.progress_v3("p") == expected
        assert await client.progress_legacy("p") == expected
    assert expected.done == (expected.download_url is not None)


async def test_fields_at_the_top_level_are_accepted():
    answers = {
        "/api/odin/v3/auth/token": {"success": True, "token": "top-token"},
        "/api/odin/v3/editor/project": {"success": True, "projectId": "p-top"},
        "/api/odin/editor/project": {"success": True, "key": "k-top"},
        "/api/odin/editor/project/saved": {"success": True, "response": {"scenes": []}},
    }
    seen_auth: list[str | None] = []

    async def handler(request):
        seen_auth.append(request.headers.get("Authorization"))
        return json_response(answers[request.path])

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, app_id="a", user_key="u") as client,
    ):
        assert await client.export_v3(v3_body(), name="n") == "p-top"
        assert await client.export_legacy([{"AIModel": {}}]) == "k-top"
        assert await client.import_project_legacy("saved") == {"scenes": []}
    assert seen_auth == [None, "top-token", "top-token", "top-token"]


async def test_a_create_answer_without_its_id_is_ambiguous():
    async def handler(_):
        return json_response({"success": True, "data": {}})

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        with pytest.raises(AmbiguousError):
            await client.export_v3(v3_body(), name="n")


async def test_separate_hosts_get_separate_sessions():
    reached = {"v3": [], "legacy": []}

    def answering(server, progress):
        async def handler(request):
            reached[server].append(request.path)
            return json_response({"success": True, "data": {"progress": progress}})

        return handler

    async with (
        tiny_server(answering("v3", 11)) as v3_url,
        tiny_server(answering("legacy", 22)) as legacy_url,
        AIStudiosClient(base_url=v3_url, legacy_base_url=legacy_url, api_key="k") as c,
    ):
        assert (await c.progress_v3("a")).progress == 11.0
        assert (await c.progress_legacy("b")).progress == 22.0
        assert len(c._sessions) == 2
    assert reached == {
        "v3": ["/api/odin/v3/editor/progress/a"],
        "legacy": ["/api/odin/editor/progress/b"],
    }


async def test_two_step_flow_against_the_simulator_bills_only_the_export(
    aistudios_client, simulator
):
    draft_id = await aistudios_client.create_draft_v3(v3_body(), name="two")
    draft = await aistudios_client.get_project_v3(draft_id)
    assert draft.export_started is False
    assert draft.document["name"] == "two"
    assert simulator.export_count == 0
    assert await aistudios_client.export_project_v3(draft_id) == draft_id
    exported = await aistudios_client.get_project_v3(draft_id)
    assert exported.export_started is True
    assert exported.backend_task_id
    assert simulator.billed_exports(draft_id) == 1


@pytest.mark.parametrize(
    ("project", "started"),
    [
        ({"_id": "p", "state": "draft", "progress": 0, "creditSubstracted": False}, False),
        ({"_id": "p"}, False),
        ({"_id": "p", "creditSubstracted": True}, True),
        ({"_id": "p", "backendTaskId": "t-1"}, True),
        ({"_id": "p", "progress": "12.5"}, True),
        ({"_id": "p", "state": "exported"}, True),
        ({"_id": "p", "download_url": "https://x/v.mp4"}, True),
    ],
)
async def test_get_project_reads_every_documented_sign_of_an_export(project, started):
    async def handler(_):
        return json_response({"success": True, "data": {"project": project}})

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        read = await client.get_project_v3("p")
    assert read.export_started is started
    assert read.id == "p"


async def test_a_lost_export_of_an_existing_project_is_ambiguous(aistudios_client, simulator):
    draft_id = await aistudios_client.create_draft_v3(v3_body(), name="lost")
    simulator.knobs.lose_response_next_exports = 1
    with pytest.raises(AmbiguousError):
        await aistudios_client.export_project_v3(draft_id)
    assert simulator.billed_exports(draft_id) == 1
