"""What `preview` says about the guard rails: the sentences, and the store read on each engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from service.jobs.budget import BudgetLimits, caps_for
from service.jobs.cache import render_key
from service.model import Job, JobState, JobUpdate, SpendCap
from service.outlook import (
    CacheFinding,
    EventFacts,
    cache_line,
    caps_line,
    coalesce_line,
    store_outlook,
)
from service.store.base import Store
from service.store.sqlite import SQLiteStore
from tests.support.jobs_fixtures import outbox_for
from tests.support.loopback import serve_app
from tests.support.postgres_fixtures import database_url
from tests.support.store_fixtures import START_TIME, StoreEngine, sample_event, sample_job

S = JobState
NOW = START_TIME


def facts(**changes: object) -> EventFacts:
    base: dict[str, object] = {
        "route": "new-product",
        "job_id": "job_new",
        "render_key": "v3:abc",
        "coalesce_key": "new-product:42",
        "cache_seconds": 600.0,
        "coalesce_seconds": 60.0,
    }
    return EventFacts(**(base | changes))  # type: ignore[arg-type]


def job(job_id: str, state: JobState = S.MAPPED, **fields: object) -> Job:
    return Job(
        job_id=job_id,
        event_row=1,
        source="shop",
        route="new-product",
        state=state,
        export_name=f"sh-{job_id}",
        created_at=NOW,
        updated_at=NOW,
        **fields,  # type: ignore[arg-type]
    )


# --- the sentences -------------------------------------------------------------------------


def test_the_cache_says_off_miss_hit_or_gone():
    assert cache_line(facts(cache_seconds=None), None, NOW) == (
        "render cache: off (route new-product sets no cache_seconds)"
    )
    assert "no cached video" in cache_line(facts(), None, NOW)
    earlier = job("job_old", S.NOTIFIED, ready_at=NOW - 30)
    hit = cache_line(facts(), CacheFinding(earlier, downloads=True), NOW)
    assert hit == (
        "render cache: hit: would reuse the video of job job_old (ready 30 s ago);"
        " nothing would be billed"
    )
    gone = cache_line(facts(), CacheFinding(earlier, downloads=False), NOW)
    assert "job_old" in gone
    assert "no longer downloads: this event would be exported again" in gone


def test_coalescing_says_off_a_new_window_or_which_job_it_supersedes():
    assert coalesce_line(facts(coalesce_key=None), [], NOW).startswith("coalescing: off")
    assert "no job waiting; this one would wait 60 s" in coalesce_line(facts(), [], NOW)
    waiting = [
        job("job_a", S.MAPPED, next_attempt_at=NOW + 12),
        job("job_b", S.HELD),
        job("job_c", S.MAPPED, next_attempt_at=NOW - 1),
    ]
    line = coalesce_line(facts(), waiting, NOW)
    assert line.startswith("coalescing: key 'new-product:42': would supersede job job_a")
    assert "job_a (mapped, its window ends in 12 s)" in line
    assert "job_b (held by a spending cap)" in line
    assert "job_c (mapped, its window is over: it may be submitted first)" in line


def test_caps_say_none_room_left_or_which_cap_would_hold_the_job():
    assert caps_line((), {}, reused=False) == "spending caps: none"
    limits = BudgetLimits(exports_per_day=5, route_per_day={"new-product": 2})
    caps = caps_for(limits, "new-product", NOW)
    day, route = _periods(caps)
    room = caps_line(caps, {route: 1, day: 3}, reused=False)
    assert room == f"spending caps: room left: {route} 1/2 spent, {day} 3/5 spent"
    full = caps_line(caps, {route: 2, day: 3}, reused=False)
    assert full.startswith(f"spending caps: would hold it now: {route} 2/2 spent")
    reused = caps_line(caps, {route: 2, day: 3}, reused=True)
    assert reused.endswith("(a reused video is not billed)")


def _periods(caps: tuple[SpendCap, ...]) -> tuple[str, str]:
    route = next(cap.period for cap in caps if cap.route is not None)
    day = next(cap.period for cap in caps if cap.route is None)
    return day, route


# --- the store, read-only, on each engine ---------------------------------------------------


@pytest.fixture
async def video_host() -> AsyncIterator[str]:
    """A loopback host where /video.mp4 downloads and anything else is 404."""

    async def video(_request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * 16, content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/video.mp4", video)
    async with serve_app(app) as url:
        yield url


async def _received(store: Store, key: str) -> str:
    event = sample_event(key)
    new = sample_job(event)
    await store.accept_event(event, [new])
    return new.job_id


@pytest.mark.anyio
async def test_the_store_answers_hit_supersede_and_full_cap_without_a_write(
    engine_store: Store, store_engine: StoreEngine, video_host: str
):
    store = engine_store
    body_key = render_key("v3", {"scenes": [], "name": "sh-x"})
    cached = await _received(store, "cached")
    await store.transition(cached, {S.RECEIVED}, S.MAPPED, JobUpdate(export_body=b"{}"))
    await store.spend_or_hold(cached, (), JobUpdate(attempts=1), lambda _j, _c: [])
    ready = JobUpdate(
        ready_at=NOW - 20, render_key=body_key, download_url=f"{video_host}/video.mp4"
    )
    submitted = JobUpdate(project_id="p-1", submitted_at=NOW - 60)
    await store.transition(cached, {S.SUBMITTING}, S.SUBMITTED, submitted)
    await store.transition(cached, {S.SUBMITTED}, S.READY, ready)
    waiting = await _received(store, "waiting")
    update = JobUpdate(
        export_body=b"{}", api="v3", coalesce_key="new-product:42", next_attempt_at=NOW + 40
    )
    await store.map_coalesced(waiting, update, lambda j: outbox_for(j, "video.superseded"))
    before = [await store.get_job(j) for j in (cached, waiting)]
    limits = BudgetLimits(exports_per_day=1)
    day = caps_for(limits, "new-product", NOW)[0].period

    hit = await store_outlook(store_engine.url, facts(render_key=body_key), limits, NOW)
    reuse = f"render cache: hit: would reuse the video of job {cached} (ready 20 s ago);"
    supersede = f"coalescing: key 'new-product:42': would supersede job {waiting}"
    assert hit == [
        f"{reuse} nothing would be billed",
        f"{supersede} (mapped, its window ends in 40 s)",
        f"spending caps: {day} 1/1 spent (a reused video is not billed)",
    ]
    miss = await store_outlook(store_engine.url, facts(coalesce_key="new-product:7"), limits, NOW)
    assert miss[0].startswith("render cache: no cached video")
    assert "no job waiting" in miss[1]
    assert miss[2].startswith(f"spending caps: would hold it now: {day} 1/1 spent")
    # The URL of the cached video is gone: the event would be exported again.
    await store.update_job(cached, JobUpdate(download_url=f"{video_host}/gone.mp4"))
    gone = await store_outlook(store_engine.url, facts(render_key=body_key), limits, NOW)
    assert "no longer downloads" in gone[0]
    duplicate = await store_outlook(store_engine.url, facts(job_id=waiting), limits, NOW)
    known = f"duplicate: the store already has this event as job {waiting} (mapped):"
    assert duplicate == [f"{known} it would not be exported again"]
    after = [await store.get_job(j) for j in (cached, waiting)]
    assert [j.state for j in after] == [j.state for j in before]
    assert after[1] == before[1]


@pytest.mark.anyio
async def test_a_missing_sqlite_store_is_said_plainly_and_not_created(tmp_path: Path):
    path = tmp_path / "state" / "studiohook.db"
    lines = await store_outlook(f"sqlite:///{path}", facts(), BudgetLimits(), NOW)
    assert lines[0] == (
        f"the store {path} does not exist yet (the service has not run with this config)"
    )
    assert lines[1].startswith("render cache: no cached video")
    assert lines[3] == "spending caps: none"
    assert not path.parent.exists()


@pytest.mark.anyio
async def test_a_missing_or_empty_postgres_store_is_said_plainly(postgres_url: str):
    missing = database_url("studiohook_no_such_database")
    lines = await store_outlook(missing, facts(), BudgetLimits(), NOW)
    assert lines[0].startswith("cannot read the PostgreSQL store:")
    assert 'database "studiohook_no_such_database" does not exist' in lines[0]
    empty = await store_outlook(postgres_url, facts(), BudgetLimits(), NOW)
    assert empty[0] == (
        "the PostgreSQL store has no studiohook tables yet (the service has not run with this config)"
    )


@pytest.mark.anyio
async def test_a_store_no_service_has_open_is_read_without_side_files(tmp_path: Path):
    path = tmp_path / "state" / "studiohook.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    before = sorted(p.name for p in path.parent.iterdir())
    lines = await store_outlook(f"sqlite:///{path}", facts(), BudgetLimits(), NOW)
    assert lines[0].startswith("render cache: no cached video")
    assert sorted(p.name for p in path.parent.iterdir()) == before == ["studiohook.db"]
