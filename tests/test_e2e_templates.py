"""Each template flow end to end in-process: webhook in, one paid call, `video.ready` out.

The simulator stands in for AI Studios; what it received is checked field by field, and a
lost answer to the paid call is reconciled by name into exactly one billed export.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread
import orjson
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.aistudios.simulator_v3 import (
    SAMPLE_PROJECT_ID,
    SAMPLE_TEMPLATE_ID,
    sample_saved_project,
    sample_server_template,
)
from service.config import load_config
from tests.support.service_fixtures import (
    EXAMPLES,
    eventually,
    running_service,
    shopify_headers,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SHOPIFY_BODY = (EXAMPLES / "shopify-product-create.json").read_bytes()
EVENT = orjson.loads(SHOPIFY_BODY)
PRICE = EVENT["variants"][0]["price"]

FLOWS = {
    "saved-project": f"""
[[templates]]
name = "tpl"
project_id = "{SAMPLE_PROJECT_ID}"
api = "v3"
""",
    "server-template": f"""
[[templates]]
name = "tpl"
template_id = "{SAMPLE_TEMPLATE_ID}"
""",
    "legacy-project": """
[[templates]]
name = "tpl"
project_id = "sample-project"
api = "legacy"
""",
}
PATCHES = {
    "saved-project": """
"scenes[0].clips[tag=parrot-image].source_url" = "{{ product.image_url }}"
"scenes[*].clips[tag=title].text" = "{{ product.title }}"
"scenes[1].scripts[1].org" = "Only {{ product.price }}."
""",
    "server-template": """
title = "{{ product.title }}"
title_2 = "{{ product.vendor }}"
scripts_1 = "Only {{ product.price }}."
""",
    "legacy-project": """
"scenes[0].AIModel.script" = "Meet {{ product.title }}."
"scenes[0].clips[type=image].detail.url" = "{{ product.image_url }}"
""",
}


def config(tmp_path: Path, flow: str, *, public_url: str | None = None):
    public = f'public_url = "{public_url}"' if public_url else ""
    text = f"""
[service]
state_dir = "{tmp_path / "state"}"
log_level = "warning"
shutdown_grace_seconds = 5

[http]
listen = "127.0.0.1:0"
{public}

[aistudios]
max_requests_per_second = 200
poll_min_interval_seconds = 0.05
poll_max_interval_seconds = 1
first_poll_seconds = 0.2
reconcile_wait_seconds = 5

[aistudios.simulator]
render_seconds = 0.3

[[sources]]
name = "shop"
kind = "shopify"
secrets = ["shpss_e2e_secret"]
{FLOWS[flow]}
[[routes]]
name = "new-product"
source = "shop"
events = ["products/create"]
template = "tpl"

[routes.patches]
{PATCHES[flow]}
[[notify]]
name = "file"
kind = "file"
path = "{tmp_path / "videos.jsonl"}"
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, env={})


async def deliver_and_wait_ready(tmp_path: Path, svc, delivery: str) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{svc.http_url}/hooks/shop",
            data=SHOPIFY_BODY,
            headers=shopify_headers(SHOPIFY_BODY, delivery),
        ) as response,
    ):
        assert response.status == 202
        (job_id,) = (await response.json())["jobs"]
    announcements = tmp_path / "videos.jsonl"

    async def announced():
        return announcements.exists() and b"video.ready" in announcements.read_bytes()

    await eventually(announced, timeout_s=15, what="video.ready")
    (ready,) = [orjson.loads(line) for line in announcements.read_bytes().splitlines()]
    assert ready["type"] == "video.ready"
    assert ready["job_id"] == job_id
    assert ready["download_url"]
    return ready


def texts(scenes):
    return [[clip.get("text") for clip in scene["clips"]] for scene in scenes]


@pytest.mark.parametrize("lose_response", [False, True], ids=["answered", "answer-lost"])
async def test_saved_v3_project_flow(tmp_path, lose_response):
    knobs = SimulatorKnobs(render_seconds=0.3, lose_response_next_exports=int(lose_response))
    async with running_service(config(tmp_path, "saved-project"), knobs) as svc:
        ready = await deliver_and_wait_ready(tmp_path, svc, "saved-1")
        sim = svc.simulator
        assert sim is not None
        job = await svc.store.get_job(ready["job_id"])
        assert job is not None
        assert job.api == "v3"
        (export,) = sim.exports_named(job.export_name)
        assert sim.export_count == 1
        assert ready["project_id"] == export.id
        history = await _history_states(svc, ready["job_id"])
    saved = sample_saved_project()["scenes"]
    sent = export.scenes
    image = sent[0]["clips"][1]
    assert image == {**saved[0]["clips"][1], "source_url": EVENT["image"]["src"]}
    assert sent[0]["clips"][0] == saved[0]["clips"][0]  # the avatar: untouched
    assert sent[0]["clips"][2] == saved[0]["clips"][2]  # tagged parrot-text: untouched
    assert texts(sent) == [
        [None, None, "Parrots can talk.", EVENT["title"]],
        [None, None, EVENT["title"], "studiohook sample"],
    ]
    assert sent[0]["scripts"] == saved[0]["scripts"]
    assert [s["org"] for s in sent[1]["scripts"]] == ["What do parrots eat?", f"Only {PRICE}."]
    assert sent[1]["scripts"][1]["modelId"] == saved[1]["scripts"][1]["modelId"]
    assert export.name == job.export_name
    assert ("reconcile" in history) == lose_response


async def _history_states(svc, job_id):
    return [t.to_state.value for t in await svc.store.job_history(job_id)]


@pytest.mark.parametrize("lose_response", [False, True], ids=["answered", "answer-lost"])
async def test_server_template_flow(tmp_path, lose_response):
    knobs = SimulatorKnobs(render_seconds=0.3, lose_response_next_exports=int(lose_response))
    cfg = config(tmp_path, "server-template", public_url="http://127.0.0.1:9")
    async with running_service(cfg, knobs) as svc:
        ready = await deliver_and_wait_ready(tmp_path, svc, "template-1")
        sim = svc.simulator
        assert sim is not None
        job = await svc.store.get_job(ready["job_id"])
        assert job is not None
        assert job.api == "v3-template"
        (export,) = sim.exports_named(job.export_name)
        assert sim.export_count == 1
        history = await _history_states(svc, ready["job_id"])
    (request,) = sim.modify_requests
    assert request.pop("webhookUrl").startswith(f"http://127.0.0.1:9/callbacks/{job.job_id}/")
    assert request == {
        "templateId": SAMPLE_TEMPLATE_ID,
        "name": job.export_name,
        "updates": {
            "title": EVENT["title"],
            "title_2": EVENT["vendor"],
            "scripts_1": f"Only {PRICE}.",
        },
        "isExport": True,
    }
    template = sample_server_template()["scenes"]
    assert texts(export.scenes) == [
        [None, None, "Subtitles here", EVENT["title"]],
        [None, None, "Ask an expert", EVENT["vendor"]],
    ]
    assert export.scenes[0]["scripts"] == template[0]["scripts"]
    assert [s["org"] for s in export.scenes[1]["scripts"]] == [f"Only {PRICE}."]
    assert ("reconcile" in history) == lose_response


async def test_reload_endpoint_swaps_in_an_edited_saved_project(tmp_path):
    async with running_service(config(tmp_path, "saved-project")) as svc:
        sim = svc.simulator
        assert sim is not None
        sim.saved_v3_projects[SAMPLE_PROJECT_ID].scenes[0]["clips"][2]["text"] = "Edited."
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{svc.http_url}/templates/reload") as response,
        ):
            assert response.status == 200
            assert await response.json() == {"templates": {"tpl": "ok"}}
        await deliver_and_wait_ready(tmp_path, svc, "after-reload")
        (export,) = [p for p in sim.projects.values() if p.rendering]
    assert export.scenes[0]["clips"][2]["text"] == "Edited."


async def test_legacy_saved_project_flow(tmp_path):
    async with running_service(config(tmp_path, "legacy-project")) as svc:
        ready = await deliver_and_wait_ready(tmp_path, svc, "legacy-1")
        sim = svc.simulator
        assert sim is not None
        job = await svc.store.get_job(ready["job_id"])
        assert job is not None
        assert job.api == "legacy"
        (export,) = [p for p in sim.projects.values() if p.api == "legacy"]
        assert sim.export_count == 1
        saved = sim.saved_projects["sample-project"].scenes
    assert export.id == ready["project_id"]
    (scene,) = export.scenes
    assert scene["AIModel"] == {**saved[0]["AIModel"], "script": f"Meet {EVENT['title']}."}
    background, image, text = scene["clips"]
    assert (background, text) == (saved[0]["clips"][0], saved[0]["clips"][2])
    assert image["detail"] == {**saved[0]["clips"][1]["detail"], "url": EVENT["image"]["src"]}


async def test_reload_command_prints_each_templates_outcome(tmp_path):
    cfg = config(tmp_path, "saved-project")
    async with running_service(cfg) as svc:
        argv = [sys.executable, "-m", "service", "reload", "--config", str(cfg.path)]
        argv += ["--url", svc.http_url]
        ok = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        )
        assert (ok.returncode, ok.stdout) == (0, "tpl: ok\n"), ok.stderr
        assert svc.simulator is not None
        del svc.simulator.saved_v3_projects[SAMPLE_PROJECT_ID]
        kept = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        )
    assert kept.returncode == 1
    assert kept.stdout == ("tpl: kept the previous version: could not be read: project not found\n")
