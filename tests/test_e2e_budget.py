"""The spending cap in the real daemon: held jobs, one announcement, CLI, metrics, release."""

import sys

import aiohttp
import anyio
import orjson
import pytest

from tests.support.metrics_text import without_instance_id
from tests.support.service_fixtures import (
    eventually,
    make_config,
    running_service,
    service_config_text,
    unique_prefix,
)
from tests.test_e2e_service import job_of, wait_until_state

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_daily_cap_holds_the_third_export_until_the_cap_is_raised(tmp_path, mqtt_broker):
    options = {"broker_port": mqtt_broker.port, "prefix": unique_prefix(), "admin_token": "t0k"}
    cfg = make_config(tmp_path, extra="[budget]\nexports_per_day = 2\n", **options)
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        jobs = [await job_of(http, svc, f"budget-{i}") for i in range(3)]
        for job_id in jobs[:2]:
            await wait_until_state(svc, job_id, "notified")
        await wait_until_state(svc, jobs[2], "held")
        assert svc.simulator.export_count == 2

        lines = tmp_path / "videos.jsonl"

        async def announced():
            text = lines.read_text() if lines.exists() else ""
            return '"budget.exhausted"' in text

        await eventually(announced, what="budget.exhausted in the file target")
        events = [orjson.loads(line) for line in lines.read_text().splitlines()]
        [exhausted] = [e for e in events if e["type"] == "budget.exhausted"]
        assert exhausted["job_id"] == jobs[2]
        assert "2 exports in day:" in exhausted["error"]["message"]

        async def cli(*args):
            command = [sys.executable, "-m", "service", "budget", *args]
            command += ["--config", str(cfg.path), "--url", svc.http_url]
            return await anyio.run_process(command, check=False)

        shown = await cli()
        assert shown.returncode == 0, shown.stderr
        day_line = next(
            line for line in shown.stdout.decode().splitlines() if line.startswith("day")
        )
        assert day_line.split()[2:] == ["2", "2", "0"]  # spent, cap, remaining
        assert "held jobs: 1" in shown.stdout.decode()

        headers = {"Authorization": "Bearer t0k"}
        async with http.get(f"{svc.http_url}/metrics", headers=headers) as response:
            metrics = without_instance_id(await response.text())
        assert 'studiohook_budget_spent{scope="day"} 2.0' in metrics
        assert 'studiohook_budget_remaining{scope="day"} 0.0' in metrics
        assert 'studiohook_jobs{state="held"} 1.0' in metrics

        # Raising the cap in the file and releasing applies it without a restart.
        raised = service_config_text(tmp_path, extra="[budget]\nexports_per_day = 3\n", **options)
        cfg.path.write_text(raised)
        released = await cli("release")
        assert released.returncode == 0, released.stderr
        await wait_until_state(svc, jobs[2], "notified")
        assert svc.simulator.export_count == 3
        events = [orjson.loads(line) for line in lines.read_text().splitlines()]
        assert [e["type"] for e in events].count("budget.exhausted") == 1

        # A config with problems changes nothing and says why.
        cfg.path.write_text(raised.replace("exports_per_day = 3", "exports_per_day = -3"))
        refused = await cli("release")
        assert refused.returncode == 1
        assert "budget.exports_per_day" in refused.stderr.decode()
