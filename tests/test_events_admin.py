"""Dead letters through the running service: the webhook answer, /metrics, the admin API and the
`studiohook events` command, including a replay after a config fix and a deliberate re-render."""

import sys

import aiohttp
import anyio
import orjson
import pytest

from service.config import load_config
from tests.support.metrics_text import without_instance_id
from tests.support.service_fixtures import (
    eventually,
    running_service,
    service_config_text,
    shopify_headers,
    unique_prefix,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TOKEN = "adm-t0ken"
# A `when` that raises for this product dead-letters the delivery at intake (an export name is
# rendered only when the job is mapped: a broken one rejects the job, see tests/test_intake.py).
BROKEN_WHEN = "when = \"product.title.split('-')[1] == 'x'\""
BODY = orjson.dumps({"id": 4711, "title": "Lamp", "image": {"src": "https://img.example/l.png"}})


def write_config(tmp_path, prefix, port, *, broken):
    text = service_config_text(tmp_path, broker_port=port, prefix=prefix, admin_token=TOKEN)
    if broken:
        text = text.replace(
            'events = ["products/create"]', f'events = ["products/create"]\n{BROKEN_WHEN}'
        )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, env={})


async def cli(cfg, url, *args, stdin=b""):
    result = await anyio.run_process(
        [sys.executable, "-m", "service", "events", *args, "--config", str(cfg.path), "--url", url],
        input=stdin,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def wait_notified(svc, job_id):
    async def done():
        job = await svc.store.get_job(job_id)
        return job is not None and job.state.value == "notified"

    await eventually(done, timeout_s=20, what=f"{job_id} notified")


async def test_dead_letter_is_answered_counted_shown_and_replayed_after_the_fix(
    tmp_path, mqtt_broker
):
    prefix = unique_prefix()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    headers = {**shopify_headers(BODY, "dl-1"), "X-Api-Key": "k-very-secret", "X-Trace": "tr-1"}

    broken = write_config(tmp_path, prefix, mqtt_broker.port, broken=True)
    async with running_service(broken) as svc, aiohttp.ClientSession() as http:
        async with http.post(f"{svc.http_url}/hooks/shop", data=BODY, headers=headers) as response:
            assert response.status == 202
            answer = await response.json()
        assert answer["status"] == "dead_lettered"
        assert answer["jobs"] == []
        async with http.post(f"{svc.http_url}/hooks/shop", data=BODY, headers=headers) as response:
            assert response.status == 200  # the sender's retry is a duplicate of the dead letter
            assert (await response.json())["status"] == "dead_lettered"
        async with http.get(f"{svc.http_url}/metrics") as response:
            metrics = without_instance_id(await response.text())
        assert 'studiohook_dead_letters_total{source="shop",step="when"} 1.0' in metrics, metrics
        async with http.get(f"{svc.http_url}/events") as response:
            assert response.status == 401

        async with http.get(
            f"{svc.http_url}/events", params={"status": "dead_lettered"}, headers=auth
        ) as response:
            (listed,) = (await response.json())["events"]
        assert listed["event_id"] == answer["event_id"]
        assert listed["failed_step"] == "routes.new-product.when"
        row = listed["id"]
        async with http.get(
            f"{svc.http_url}/events/{answer['event_id']}", headers=auth
        ) as response:
            shown = await response.json()
        assert shown["id"] == row
        assert shown["headers"]["x-api-key"] == "***"
        assert shown["headers"]["x-trace"] == "tr-1"
        assert "x-shopify-hmac-sha256" not in shown["headers"]
        assert shown["payload"]["title"] == "Lamp"
        assert shown["reason"].startswith("routes.new-product.when: MappingError: ")

        code, out, err = await cli(broken, svc.http_url, "--status", "dead_lettered")
        assert code == 0, err
        assert answer["event_id"] in out
        assert "routes.new-product.when" in out
        code, out, err = await cli(broken, svc.http_url, "show", str(row))
        assert code == 0, err
        assert "k-very-secret" not in out
        assert "Lamp" in out
        assert "tr-1" in out
        code, out, err = await cli(broken, svc.http_url, "replay", str(row))
        assert code == 0, err
        assert "dead_lettered again" in out  # the config is still broken
        assert svc.simulator.export_count == 0

    fixed = write_config(tmp_path, prefix, mqtt_broker.port, broken=False)
    async with running_service(fixed) as svc:
        code, out, err = await cli(
            fixed, svc.http_url, "replay", "--source", "shop", "--since", "1h"
        )
        assert code == 0, err
        assert "created" in out
        (job_id,) = [j.job_id for j in await svc.store.jobs_in_states(set(_all_states()))]
        await wait_notified(svc, job_id)
        assert svc.simulator.export_count == 1

        code, out, err = await cli(fixed, svc.http_url, "replay", str(row))
        assert code == 0, err
        assert "exists (notified), nothing paid" in out
        code, out, err = await cli(fixed, svc.http_url, "--status", "dead_lettered")
        assert answer["event_id"] not in out

        code, out, err = await cli(
            fixed, svc.http_url, "replay", str(row), "--rerender", stdin=b"no\n"
        )
        assert code == 1
        assert "Type 'yes'" in err
        assert (await svc.store.get_job(job_id)).state.value == "notified"
        first_name = (await svc.store.get_job(job_id)).export_name

        code, out, err = await cli(
            fixed, svc.http_url, "replay", str(row), "--rerender", stdin=b"yes\n"
        )
        assert code == 0, err
        assert "re-rendering (new round)" in out
        await wait_notified(svc, job_id)
        assert svc.simulator.export_count == 2
        assert (await svc.store.get_job(job_id)).export_name != first_name


async def test_events_commands_explain_bad_usage_and_unknown_events(tmp_path, mqtt_broker):
    cfg = write_config(tmp_path, unique_prefix(), mqtt_broker.port, broken=False)
    async with running_service(cfg) as svc:
        code, _, err = await cli(cfg, svc.http_url, "replay")
        assert code == 2
        assert "needs event ids" in err
        code, _, err = await cli(cfg, svc.http_url, "show", "evt_nope")
        assert code == 1
        assert "no event evt_nope" in err
        code, _, err = await cli(cfg, svc.http_url, "--since", "yesterday-ish")
        assert code == 2
        assert "--since" in err


def _all_states():
    from service.model import JobState  # noqa: PLC0415

    return set(JobState)
