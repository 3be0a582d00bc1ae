"""The whole service in-process: real HTTP, real Mosquitto, real SQLite, the simulator."""

import hashlib

import aiohttp
import aiomqtt
import anyio
import orjson
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.model import JobState
from tests.support.cli_runner import jobs_cli
from tests.support.metrics_text import without_instance_id
from tests.support.mqtt_fixtures import free_port
from tests.support.service_fixtures import (
    EXAMPLES,
    eventually,
    make_config,
    running_service,
    shopify_headers,
    unique_prefix,
    webhook_receiver,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SHOPIFY_BODY = (EXAMPLES / "shopify-product-create.json").read_bytes()


async def job_state(session, base, job_id):
    async with session.get(f"{base}/jobs/{job_id}") as response:
        return (await response.json())["state"]


async def post_shop(http, svc, delivery, body=SHOPIFY_BODY, topic="products/create"):
    async with http.post(
        f"{svc.http_url}/hooks/shop", data=body, headers=shopify_headers(body, delivery, topic)
    ) as response:
        return response.status, await response.json()


async def job_of(http, svc, delivery, body=SHOPIFY_BODY):
    status, answer = await post_shop(http, svc, delivery, body)
    assert status == 202, answer
    return answer["jobs"][0]


async def wait_until_state(svc, job_id, *states, timeout_s=15.0):
    async def reached():
        job = await svc.store.get_job(job_id)
        return job is not None and job.state.value in states

    await eventually(reached, timeout_s=timeout_s, what=f"{job_id} in {states}")


async def test_webhook_and_mqtt_events_become_videos_announced_everywhere(tmp_path, mqtt_broker):
    prefix = unique_prefix()
    async with webhook_receiver() as (hook_url, receiver):
        cfg = make_config(
            tmp_path, broker_port=mqtt_broker.port, prefix=prefix, webhook_url=hook_url
        )
        async with (
            aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier=f"{prefix}-watch") as watcher,
            running_service(cfg) as svc,
            aiohttp.ClientSession() as http,
        ):
            await watcher.subscribe(f"{prefix}/videos/#", qos=1)
            async with http.post(
                f"{svc.http_url}/hooks/shop",
                data=SHOPIFY_BODY,
                headers=shopify_headers(SHOPIFY_BODY, "delivery-1"),
            ) as response:
                assert response.status == 202
                accepted = await response.json()
            assert accepted["event_id"] == "delivery-1"
            assert len(accepted["jobs"]) == 1
            device = {"id": "dev-7", "title": "Desk lamp", "image_url": "https://img.example/l.png"}
            await watcher.publish(f"{prefix}/in/lamps", orjson.dumps(device), qos=1)

            announced = {}
            with anyio.fail_after(20):
                async for message in watcher.messages:
                    payload = orjson.loads(message.payload)
                    announced[payload["job_id"]] = (str(message.topic), payload)
                    if len(announced) == 2:
                        break
            shop_job = accepted["jobs"][0]
            topic, ready = announced[shop_job]
            assert topic == f"{prefix}/videos/new-product/{shop_job}"
            assert ready["type"] == "video.ready"
            assert ready["event_id"] == "delivery-1"
            assert ready["source"] == "shop"
            assert ready["progress"] == 100
            (device_job,) = set(announced) - {shop_job}
            assert announced[device_job][1]["route"] == "device-product"

            for _, payload in announced.values():
                async with http.get(payload["download_url"]) as video:
                    assert video.status == 200
                    assert (await video.read())[4:8] == b"ftyp"

            async def webhooks_delivered():
                return len(receiver.deliveries) >= 2

            await eventually(webhooks_delivered, what="webhook deliveries")
            assert receiver.bad_signatures == 0
            assert {orjson.loads(b)["job_id"] for _, b in receiver.deliveries} == set(announced)

            async def all_notified():
                states = [await job_state(http, svc.http_url, j) for j in announced]
                return states == [JobState.NOTIFIED.value] * 2

            await eventually(all_notified, what="jobs notified")
            lines = [orjson.loads(x) for x in (tmp_path / "videos.jsonl").read_bytes().splitlines()]
            assert {line["job_id"] for line in lines} == set(announced)
            assert svc.simulator is not None
            assert svc.simulator.export_count == 2


async def test_redelivered_webhook_is_one_job_and_one_export(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        answers = [await post_shop(http, svc, "same-delivery") for _ in range(3)]
        assert [status for status, _ in answers] == [202, 200, 200]
        assert answers[0][1] == answers[1][1] == answers[2][1]
        job_id = answers[0][1]["jobs"][0]

        await wait_until_state(svc, job_id, "notified")
        assert svc.simulator.export_count == 1
        async with http.get(f"{svc.http_url}/jobs/{job_id}") as response:
            job = await response.json()
        assert [step["to"] for step in job["history"]] == [
            "received",
            "mapped",
            "submitting",
            "submitted",
            "ready",
            "notified",
        ]
        assert "callback_token" not in job
        assert "export_body" not in job


async def test_unrouted_event_is_committed_and_answered_with_no_jobs(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        status, answer = await post_shop(http, svc, "upd-1", topic="products/update")
        assert status == 202
        assert answer == {"event_id": "upd-1", "jobs": [], "status": "ignored"}
        assert svc.simulator.export_count == 0


async def test_mapping_error_rejects_job_with_reason_and_retry_is_guarded(tmp_path, mqtt_broker):
    prefix = unique_prefix()
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=prefix, admin_token="adm")
    body = orjson.dumps({"id": 99, "title": "No image"})  # image_src missing -> image_url null
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "noimg", body)
        auth = {"Authorization": "Bearer adm"}
        async with http.get(f"{svc.http_url}/jobs/{job_id}") as response:
            assert response.status == 401

        await wait_until_state(svc, job_id, "rejected")
        async with http.get(f"{svc.http_url}/jobs/{job_id}", headers=auth) as response:
            job = await response.json()
        assert job["error_code"] == "mapping_error"
        assert "product.image_url" in job["error_message"]
        async with http.get(
            f"{svc.http_url}/jobs", params={"state": "rejected"}, headers=auth
        ) as response:
            assert [j["job_id"] for j in (await response.json())["jobs"]] == [job_id]
        async with http.post(f"{svc.http_url}/jobs/{job_id}/retry", headers=auth) as response:
            assert response.status == 202
        await wait_until_state(svc, job_id, "rejected")
        async with http.post(f"{svc.http_url}/jobs/nope/retry", headers=auth) as response:
            assert response.status == 404
        assert svc.simulator.export_count == 0

        def announced():
            announcements = tmp_path / "videos.jsonl"
            lines = announcements.read_bytes().splitlines() if announcements.exists() else []
            return [orjson.loads(line) for line in lines]

        async def both_rounds_announced():
            return len(announced()) >= 2

        await eventually(both_rounds_announced, what="a video.failed for each round")
        failed = announced()
        assert len(failed) == 2  # the first round and the retried one, each announced once
        assert [line["type"] for line in failed] == ["video.failed"] * 2
        assert [line["job_id"] for line in failed] == [job_id] * 2
        assert [line["error"]["code"] for line in failed] == ["mapping_error"] * 2


async def test_callback_brings_the_confirming_poll_forward(tmp_path, mqtt_broker):
    port = free_port()
    cfg = make_config(
        tmp_path,
        broker_port=mqtt_broker.port,
        prefix=unique_prefix(),
        listen=f"127.0.0.1:{port}",
        public_url=f"http://127.0.0.1:{port}",
        # A first poll far away: only the callback can make the job ready quickly.
        first_poll_s=60.0,
        poll_min_s=30.0,
    )
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "cb")

        await wait_until_state(svc, job_id, "ready", "notified", timeout_s=10)
        project = next(iter(svc.simulator.projects.values()))
        assert project.webhook_url.startswith(f"http://127.0.0.1:{port}/callbacks/{job_id}/")
        async with http.post(f"{svc.http_url}/callbacks/{job_id}/forged-token") as response:
            assert response.status == 404
        async with http.get(f"{svc.http_url}/metrics") as response:
            text = without_instance_id(await response.text())
            assert "studiohook_detection_lag_seconds_count 1.0" in text


async def test_store_outage_answers_503_and_commits_nothing(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        await svc.store.close()
        async with http.post(
            f"{svc.http_url}/hooks/shop",
            data=SHOPIFY_BODY,
            headers=shopify_headers(SHOPIFY_BODY, "x"),
        ) as response:
            assert response.status == 503
            assert "Retry-After" in response.headers
        async with http.get(f"{svc.http_url}/readyz") as response:
            assert response.status == 503
            assert "store" in (await response.json())["problems"]


async def test_metrics_count_events_exports_and_states(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    knobs = SimulatorKnobs(render_seconds=0.3)
    async with running_service(cfg, knobs) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "m1")
        assert (await post_shop(http, svc, "m1"))[0] == 200

        await wait_until_state(svc, job_id, "notified")
        async with http.get(f"{svc.http_url}/metrics") as response:
            text = without_instance_id(await response.text())
        assert 'studiohook_events_total{outcome="accepted",source="shop"} 1.0' in text
        assert 'studiohook_events_total{outcome="duplicate",source="shop"} 1.0' in text
        assert "studiohook_exports_submitted_total 1.0" in text
        assert 'studiohook_jobs{state="notified"} 1.0' in text
        assert 'studiohook_api_calls_total{endpoint="v3.draft",outcome="ok"} 1.0' in text
        assert 'studiohook_api_calls_total{endpoint="v3.project_export",outcome="ok"} 1.0' in text
        assert "studiohook_polls_per_job_count 1.0" in text
        assert "studiohook_render_seconds_count 1.0" in text
        assert "studiohook_outbox_backlog 0.0" in text
        async with http.get(f"{svc.http_url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{svc.http_url}/readyz") as response:
            assert (await response.json()) == {"status": "ready", "roles": {"mqtt": "reader"}}


async def test_route_with_download_keeps_an_atomic_local_copy_and_announces_it(
    tmp_path, mqtt_broker
):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix(), download=True)
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "dl")

        await wait_until_state(svc, job_id, "notified")
    lines = [orjson.loads(x) for x in (tmp_path / "videos.jsonl").read_bytes().splitlines()]
    (ready,) = lines
    video = tmp_path / "state" / "videos" / f"{job_id}.mp4"
    assert ready["video_path"] == str(video)
    data = video.read_bytes()
    assert data[4:8] == b"ftyp"
    assert ready["video_sha256"] == hashlib.sha256(data).hexdigest()
    assert [p.name for p in video.parent.iterdir()] == [video.name]


async def test_jobs_commands_list_show_and_retry_through_the_admin_api(tmp_path, mqtt_broker):

    cfg = make_config(
        tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix(), admin_token="t0k"
    )
    body = orjson.dumps({"id": 5, "title": "No image"})
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "cli-jobs", body)

        await wait_until_state(svc, job_id, "rejected")

        code, listing, stderr = await jobs_cli(
            cfg.path, svc.http_url, "--status", "rejected", "--wide"
        )
        assert code == 0, stderr
        assert job_id in listing
        code, shown, _ = await jobs_cli(cfg.path, svc.http_url, "show", job_id)
        assert code == 0
        assert "mapping_error" in shown
        assert "history" in shown
        code, retried, stderr = await jobs_cli(cfg.path, svc.http_url, "retry", job_id)
        assert code == 0, stderr
        assert f"{job_id}: received" in retried
        code, _, stderr = await jobs_cli(cfg.path, svc.http_url, "show", "job_missing")
        assert code == 1
        assert "no job job_missing" in stderr


async def test_with_no_notify_target_a_ready_job_is_done(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix(), notify=False)
    assert cfg.notify == ()
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        job_id = await job_of(http, svc, "nt")

        await wait_until_state(svc, job_id, "notified")
