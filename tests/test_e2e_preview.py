"""`studiohook preview` asks the real store what the guard rails would do with an event now."""

import sys
import time
from pathlib import Path

import aiohttp
import anyio
import orjson
import psycopg
import pytest
from psycopg import sql

from service.jobs.budget import day_name
from tests.support.mqtt_fixtures import free_port
from tests.support.service_fixtures import make_config, running_service, unique_prefix
from tests.test_e2e_service import SHOPIFY_BODY, job_of, wait_until_state

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROUTE = 'cache_seconds = 600\ncoalesce_key = "{{ event.id }}"\ncoalesce_seconds = 0.2\n'


def product(title: str) -> bytes:
    return orjson.dumps(orjson.loads(SHOPIFY_BODY) | {"title": title})


def event_file(tmp_path: Path, webhook_id: str, body: bytes) -> Path:
    path = tmp_path / f"{webhook_id}.json"
    path.write_bytes(body)
    headers = {"X-Shopify-Topic": "products/create", "X-Shopify-Webhook-Id": webhook_id}
    path.with_name(f"{webhook_id}.headers.json").write_bytes(orjson.dumps(headers))
    return path


async def preview_output(config: Path, event: Path) -> list[str]:
    """`studiohook preview`'s guard-rail block, its header line first."""
    command = [sys.executable, "-m", "service", "preview", "--config", str(config)]
    command += ["--route", "new-product", "--event", str(event)]
    result = await anyio.run_process(command, check=False)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# guard rails right now"))
    return lines[start:]


async def preview(config: Path, event: Path) -> list[str]:
    return [line.removeprefix("#   ") for line in (await preview_output(config, event))[1:]]


async def test_preview_names_the_cached_video_the_job_it_supersedes_and_the_full_cap(
    tmp_path, mqtt_broker
):
    options = {"broker_port": mqtt_broker.port, "prefix": unique_prefix(), "route_extra": ROUTE}
    cfg = make_config(tmp_path, extra="[budget]\nexports_per_day = 1\n", **options)
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        exported = await job_of(http, svc, "pv-a", SHOPIFY_BODY)
        await wait_until_state(svc, exported, "notified")
        held = await job_of(http, svc, "pv-b", product("Mug, new photo"))
        await wait_until_state(svc, held, "held")
        key = (await svc.store.get_job(held)).coalesce_key
        day = f"day:{day_name(time.time())}"

        same_body = await preview(cfg.path, event_file(tmp_path, "pv-c", SHOPIFY_BODY))
        assert same_body[0].startswith(
            f"render cache: hit: would reuse the video of job {exported}"
        )
        assert same_body[1] == (
            f"coalescing: key {key!r}: would supersede job {held} (held by a spending cap)"
        )
        assert same_body[2] == f"spending caps: {day} 1/1 spent (a reused video is not billed)"

        # Preview only read: the held job still waits, nothing new was exported or stored.
        assert (await svc.store.get_job(held)).state.value == "held"
        assert svc.simulator.export_count == 1
        assert sum((await svc.store.count_jobs_by_state()).values()) == 2

        # What preview said happens, and the job history shows it.
        sent = await job_of(http, svc, "pv-c", SHOPIFY_BODY)
        await wait_until_state(svc, sent, "notified")
        assert svc.simulator.export_count == 1
        superseded = await jobs_show(cfg.path, svc.http_url, held)
        assert f"superseded_by {sent}" in superseded
        assert "spending cap reached: 1 exports in day:" in superseded
        assert "held superseded" in superseded
        async with http.get(f"{svc.http_url}/jobs/{sent}") as response:
            reused = await response.json()  # what `jobs show` prints
        assert reused["reused_from"] == exported
        assert [step["note"] for step in reused["history"]][-2:] == [
            f"reused the video of {exported}",
            None,
        ]


async def jobs_show(config: Path, url: str, job_id: str) -> str:
    command = [sys.executable, "-m", "service", "jobs", "show", job_id, "--config", str(config)]
    result = await anyio.run_process([*command, "--url", url], check=False)
    assert result.returncode == 0, result.stderr.decode()
    # The table's cells, borders dropped, spaces collapsed: "field value" and "from to ...".
    return " ".join(result.stdout.decode().replace("│", " ").split())


# Every table whose rows a write by preview would change (heartbeat and outbox claims move
# on their own while the service runs; the outbox is compared by its rows' ids and types).
STATE_TABLES = ("events", "jobs", "transitions", "spend", "budget_alerts", "render_estimates")
# The running service's heartbeat renews the lease of every unfinished job it owns (the held
# one here) whenever it comes round, so that one column may move during the preview; owner and
# fence, which any claim changes, are still compared, as is every other column.
HEARTBEAT_COLUMNS = {"jobs": ["lease_until"]}


def database_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(url) as conn:
        rows = {
            table: conn.execute(
                sql.SQL("SELECT to_jsonb(t) - %s::text[] FROM {} AS t ORDER BY 1").format(
                    sql.Identifier(table)
                ),
                (HEARTBEAT_COLUMNS.get(table, []),),
            ).fetchall()
            for table in STATE_TABLES
        }
        rows["outbox"] = conn.execute(
            "SELECT id, job_id, event_type FROM outbox ORDER BY 1"
        ).fetchall()
    return rows


async def test_preview_reads_the_guard_rails_from_postgresql_and_writes_nothing(
    tmp_path, mqtt_broker, postgres_url
):
    options = {"broker_port": mqtt_broker.port, "prefix": unique_prefix(), "route_extra": ROUTE}
    extra = f'[budget]\nexports_per_day = 1\n\n[store]\nurl = "{postgres_url}"\n'
    cfg = make_config(tmp_path, extra=extra, **options)
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        exported = await job_of(http, svc, "pg-a", SHOPIFY_BODY)
        await wait_until_state(svc, exported, "notified")
        held = await job_of(http, svc, "pg-b", product("Mug, new photo"))
        await wait_until_state(svc, held, "held")
        key = (await svc.store.get_job(held)).coalesce_key
        before = await anyio.to_thread.run_sync(database_rows, postgres_url)

        output = await preview_output(cfg.path, event_file(tmp_path, "pg-c", SHOPIFY_BODY))
        assert output[0].startswith("# guard rails right now (postgresql://")
        assert output[0].endswith(", read-only)")
        lines = [line.removeprefix("#   ") for line in output[1:]]
        assert lines[0].startswith(f"render cache: hit: would reuse the video of job {exported}")
        assert lines[1] == (
            f"coalescing: key {key!r}: would supersede job {held} (held by a spending cap)"
        )
        assert lines[2] == (
            f"spending caps: day:{day_name(time.time())} 1/1 spent (a reused video is not billed)"
        )

        assert await anyio.to_thread.run_sync(database_rows, postgres_url) == before
        assert svc.simulator.export_count == 1


async def test_preview_names_the_store_without_its_user_or_password(tmp_path):
    # Nothing listens on the port: the header is printed before the store is read.
    port = free_port()
    url = f"postgresql://app:pg-s3cret@127.0.0.1:{port}/hooks?connect_timeout=2&password=pg-s3cret"
    extra = f'[store]\nurl = "{url}"\n'
    cfg = make_config(tmp_path, broker_port=free_port(), prefix=unique_prefix(), extra=extra)
    output = await preview_output(cfg.path, event_file(tmp_path, "pv-u", SHOPIFY_BODY))
    printed = f"postgresql://127.0.0.1:{port}/hooks?connect_timeout=2&password=***"
    assert output[0] == f"# guard rails right now ({printed}, read-only)"
    assert output[1].startswith("#   cannot read the PostgreSQL store:")
    assert "pg-s3cret" not in "\n".join(output)
