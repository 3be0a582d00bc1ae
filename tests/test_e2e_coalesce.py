"""Coalescing in the real daemon: a burst of updates to one product is one export."""

import aiohttp
import orjson
import pytest

from tests.support.service_fixtures import eventually, make_config, running_service, unique_prefix
from tests.test_e2e_service import SHOPIFY_BODY, job_of, wait_until_state

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROUTE = 'coalesce_key = "{{ event.id }}"\ncoalesce_seconds = 1.0\n'


def product(title: str) -> bytes:
    return orjson.dumps(orjson.loads(SHOPIFY_BODY) | {"title": title})


async def test_four_updates_make_one_export_from_the_last_and_three_superseded(
    tmp_path, mqtt_broker
):
    cfg = make_config(
        tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix(), route_extra=ROUTE
    )
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        jobs = [await job_of(http, svc, f"save-{i}", product(f"Mug version {i}")) for i in range(4)]
        for job_id in jobs[:3]:
            await wait_until_state(svc, job_id, "superseded")
        await wait_until_state(svc, jobs[3], "notified")
        assert svc.simulator.export_count == 1
        [project] = [p for p in svc.simulator.projects.values() if p.backend_task_id]
        assert "Mug version 3" in orjson.dumps(project.scenes).decode()
        for job_id in jobs[:3]:
            job = await svc.store.get_job(job_id)
            assert job.superseded_by == jobs[3]  # the job that rendered, never a chain
            assert job.project_id is None

        lines = tmp_path / "videos.jsonl"

        async def announced():
            events = [orjson.loads(line) for line in lines.read_text().splitlines()]
            return sorted(e["job_id"] for e in events if e["type"] == "video.superseded")

        await eventually(lambda: _equal(announced, sorted(jobs[:3])), what="3 superseded")

        # An update after the export was submitted is a new job, exported on its own.
        later = await job_of(http, svc, "save-later", product("Mug version 4"))
        await wait_until_state(svc, later, "notified")
        assert svc.simulator.export_count == 2
        assert (await svc.store.get_job(jobs[3])).state.value == "notified"


async def _equal(read, expected):
    return await read() == expected
