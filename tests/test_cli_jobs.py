"""`studiohook jobs` in a terminal: short ids, columns by priority, and the admin API behind it."""

import io
from dataclasses import replace

import aiohttp
import orjson
import pytest
from rich.console import Console

from service.cli_tables import columns_that_fit, jobs_table, short_job_ids
from tests.support.cli_runner import jobs_cli
from tests.support.service_fixtures import (
    EXAMPLES,
    eventually,
    make_config,
    running_service,
    shopify_headers,
    unique_prefix,
)
from tests.support.store_fixtures import sample_event, sample_job

LONG_ERROR = (
    "route 'new-product' patch scenes[0].clips[type=image].source_url: "
    "'product.image_url' is undefined"
)
JOBS = [
    {
        "job_id": "job_77f84eff37abe9ec7c5765d1",
        "route": "new-product",
        "state": "rejected",
        "progress": 0,
        "error_message": LONG_ERROR,
        "project_id": None,
    },
    {
        "job_id": "job_77f84eff99abe9ec7c5765d1",
        "route": "device-product",
        "state": "submitting",
        "progress": 42.5,
        "error_message": None,
        "project_id": "6650f0e8c0a1b2c3d4e5f607",
    },
    {
        "job_id": "job_0b1c2d3e4f5a6b7c8d9e0f1a",
        "route": "device-product",
        "state": "notified",
        "progress": 100.0,
        "error_message": None,
        "project_id": "6650f0e8c0a1b2c3d4e5f608",
    },
]


def rendered(table, width):
    console = Console(width=width, record=True, markup=False, highlight=False, file=io.StringIO())
    console.print(table)
    return console.export_text()


def unfolded(text):
    """The table's text with every line break and padding removed: folded cells read whole."""
    return "".join(text.split())


# --- pure layout ------------------------------------------------------------------------------


def test_short_ids_are_the_shortest_unique_prefix_of_at_least_eight_hex_digits():
    ids = ["job_77f84eff37ab", "job_77f84eff99ab", "job_0b1c2d3e4f5a", "job_0b1c2d3e4f5a"]
    short = short_job_ids(ids)
    assert short == {
        "job_77f84eff37ab": "77f84eff3",
        "job_77f84eff99ab": "77f84eff9",
        "job_0b1c2d3e4f5a": "0b1c2d3e",
    }
    assert short_job_ids(["job_abc"]) == {"job_abc": "abc"}  # never longer than the id
    assert short_job_ids(["job_aaaa1", "job_aaaa2"], min_chars=2) == {
        "job_aaaa1": "aaaa1",
        "job_aaaa2": "aaaa2",
    }


def test_columns_are_dropped_by_priority_when_even_folding_cannot_fit_them():
    natural = {"job": 9, "route": 14, "state": 10, "progress": 8, "error": 98, "project": 24}
    assert columns_that_fit(natural, 200) == [
        "job",
        "route",
        "state",
        "progress",
        "error",
        "project",
    ]
    assert columns_that_fit(natural, 80) == ["job", "route", "state", "progress", "error"]
    assert columns_that_fit(natural, 60) == ["job", "state", "progress", "error"]


@pytest.mark.parametrize("width", [80, 60])
def test_at_a_narrow_width_job_route_state_progress_and_error_read_whole(width):
    text = rendered(jobs_table(JOBS, width), width)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    assert "…" not in text
    assert lines[0].split()[:1] == ["job"]
    short = {
        "job_77f84eff37": "77f84eff3",
        "job_77f84eff99": "77f84eff9",
        "job_0b1c2d3e4f": "0b1c2d3e",
    }
    for job in JOBS:
        row = next(line for line in lines if line.split()[:1] == [short[job["job_id"][:14]]])
        assert job["state"] in row.split()
        assert f"{job['progress']:.0f}%" in row.split()
        if width == 80:
            assert job["route"] in row.split()
    assert unfolded(LONG_ERROR) in unfolded(text)


def test_a_wide_terminal_shows_the_project_and_wide_mode_whole_ids():
    assert "6650f0e8c0a1b2c3d4e5f607" in rendered(jobs_table(JOBS, 140), 140)
    wide = rendered(jobs_table(JOBS, 10_000, wide=True), 10_000)
    for job in JOBS:
        line = next(line for line in wide.splitlines() if job["job_id"] in line)
        assert job["route"] in line
    assert LONG_ERROR in wide


# --- through the real command line and admin API ----------------------------------------------


async def cli(cfg, svc, *args, columns=80):
    return await jobs_cli(cfg.path, svc.http_url, *args, columns=columns)


@pytest.mark.anyio
@pytest.mark.integration
async def test_jobs_at_80_columns_then_show_and_retry_by_short_id(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    good = (EXAMPLES / "shopify-product-create.json").read_bytes()
    bad = orjson.dumps({"id": 5, "title": "No image", "body_html": "x"})
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        ids = {}
        for delivery, body in (("good", good), ("bad", bad)):
            headers = shopify_headers(body, delivery)
            async with http.post(f"{svc.http_url}/hooks/shop", data=body, headers=headers) as r:
                assert r.status == 202
                ids[delivery] = (await r.json())["jobs"][0]

        async def settled():
            good_job = await svc.store.get_job(ids["good"])
            bad_job = await svc.store.get_job(ids["bad"])
            return good_job.state.value == "notified" and bad_job.state.value == "rejected"

        await eventually(settled, what="one job notified, one rejected")
        bad_job = await svc.store.get_job(ids["bad"])

        code, listing, stderr = await cli(cfg, svc)
        assert code == 0, stderr
        lines = listing.splitlines()
        assert max(len(line.rstrip()) for line in lines) <= 80
        assert "…" not in listing
        short = {job_id: job_id[4:12] for job_id in ids.values()}
        good_row = next(line for line in lines if line.startswith(short[ids["good"]]))
        assert good_row.split()[1:4] == ["new-product", "notified", "100%"]
        bad_row = next(line for line in lines if line.startswith(short[ids["bad"]]))
        assert bad_row.split()[1:4] == ["new-product", "rejected", "0%"]
        assert unfolded(bad_job.error_message) in unfolded(listing)

        code, shown, _ = await cli(cfg, svc, "show", short[ids["bad"]])
        assert code == 0
        assert ids["bad"] in shown
        assert "mapping_error" in shown

        code, retried, stderr = await cli(cfg, svc, "retry", short[ids["bad"]])
        assert code == 0, stderr
        assert retried.strip() == f"{ids['bad']}: received"

        code, wide, _ = await cli(cfg, svc, "--wide")
        assert ids["good"] in wide
        assert ids["bad"] in wide
        code, as_json, _ = await cli(cfg, svc, "--json")
        assert {j["job_id"] for j in orjson.loads(as_json)["jobs"]} == set(ids.values())

        code, _, stderr = await cli(cfg, svc, "show", "ffffffffff")
        assert code == 1
        assert "no job ffffffffff" in stderr


@pytest.mark.anyio
@pytest.mark.integration
async def test_admin_answers_an_ambiguous_short_id_with_its_candidates(tmp_path, mqtt_broker):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    event = sample_event("twins")
    twins = ["job_abcd1234aaaa", "job_abcd1234bbbb"]
    jobs = [
        replace(sample_job(event, route), job_id=i) for route, i in zip("xy", twins, strict=True)
    ]
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        await svc.store.accept_event(event, jobs)
        async with http.get(f"{svc.http_url}/jobs/abcd1234") as response:
            assert response.status == 400
            answer = await response.json()
        assert answer["candidates"] == twins
        assert "ambiguous" in answer["error"]
        async with http.get(f"{svc.http_url}/jobs/job_abcd1234b") as response:
            assert response.status == 200
            assert (await response.json())["job_id"] == twins[1]
        async with http.get(f"{svc.http_url}/jobs/abc") as response:
            assert response.status == 404  # too short to be taken as a prefix
