"""The render cache: identical export bodies reuse a video that still downloads."""

import orjson
import pytest

from service.jobs.cache import canonical_body, render_key, reuse_since
from service.jobs.submitter import RenderCache
from service.model import JobState, JobUpdate
from service.notify.payload import ready_payload
from service.notify.probe import HttpProbe
from service.store.base import Store
from tests.support.aistudios_fixtures import v3_body
from tests.support.jobs_fixtures import jobs_harness
from tests.support.store_fixtures import START_TIME, sample_event, sample_job

S = JobState


def test_the_export_name_does_not_make_two_bodies_different_but_any_content_does():
    first = {"name": "sh-1 #job_a", "scenes": [{"clips": [{"script": "Hi"}]}], "width": 1}
    second = {"width": 1, "scenes": [{"clips": [{"script": "Hi"}]}], "name": "sh-2 #job_b"}
    assert canonical_body(first) == canonical_body(second)
    assert render_key("v3", first) == render_key("v3", second)
    changed = {**second, "scenes": [{"clips": [{"script": "Hello"}]}]}
    assert render_key("v3", first) != render_key("v3", changed)
    assert render_key("v3", first) != render_key("legacy", first)


def test_the_window_is_off_unless_a_route_sets_one():
    assert reuse_since(1000.0, None) is None
    assert reuse_since(1000.0, 0.0) is None
    assert reuse_since(1000.0, 600.0) == 400.0


@pytest.fixture
async def probe():
    probe = HttpProbe()
    yield probe
    await probe.aclose()


def cache_of(probe, hits):
    return RenderCache(seconds_for=lambda _job: 600.0, probe=probe, on_hit=hits.append)


@pytest.mark.anyio
async def test_two_identical_bodies_make_one_export_and_two_ready_videos(tmp_path, probe):
    hits = []
    async with jobs_harness(tmp_path, cache=cache_of(probe, hits)) as h:
        first = await h.add_job("same-1", body=v3_body())
        done = await h.store.wait_for(first.job_id, {S.READY, S.FAILED})
        assert done.state is S.READY
        second = await h.add_job("same-2", body=v3_body())
        reused = await h.store.wait_for(second.job_id, {S.READY, S.FAILED})
        assert reused.state is S.READY
        assert reused.reused_from == first.job_id
        assert reused.download_url == done.download_url
        assert h.simulator.export_count == 1
        assert [job.job_id for job in hits] == [second.job_id]
        [row] = await h.outbox(second.job_id)
        assert row["type"] == "video.ready"
        assert orjson.loads(ready_payload(reused))["reused_from"] == first.job_id
        assert "reused_from" not in orjson.loads(ready_payload(done))
        # A different body is exported.
        third = await h.add_job("different", body=v3_body(scenes=2))
        assert (await h.store.wait_for(third.job_id, {S.READY, S.FAILED})).reused_from is None
        assert h.simulator.export_count == 2


@pytest.mark.anyio
async def test_a_cached_video_whose_url_is_gone_is_exported_again(tmp_path, probe):
    hits = []
    async with jobs_harness(tmp_path, cache=cache_of(probe, hits)) as h:
        first = await h.add_job("gone-1", body=v3_body())
        done = await h.store.wait_for(first.job_id, {S.READY, S.FAILED})
        gone = f"{h.simulator.base_url}/_simulator/videos/no-such-project.mp4"
        await h.store.update_job(first.job_id, JobUpdate(download_url=gone))
        second = await h.add_job("gone-2", body=v3_body())
        exported = await h.store.wait_for(second.job_id, {S.READY, S.FAILED})
        assert exported.state is S.READY
        assert exported.reused_from is None
        assert exported.download_url != done.download_url
        assert h.simulator.export_count == 2
        assert hits == []
        assert await probe.downloads(exported.download_url)
        assert not await probe.downloads(gone)


# --- the store's lookup, on every engine ---------------------------------------------------


async def ready_job(store: Store, key: str, *, ready_at: float, **fields: str) -> str:
    event = sample_event(key)
    new = sample_job(event)
    await store.accept_event(event, [new])
    await store.transition(new.job_id, {S.RECEIVED}, S.MAPPED, JobUpdate(export_body=b"{}"))
    update = JobUpdate(ready_at=ready_at, progress=100.0, **fields)
    await store.transition(new.job_id, {S.MAPPED}, S.READY, update)
    return new.job_id


@pytest.mark.anyio
async def test_the_lookup_finds_the_latest_own_export_still_in_the_window(engine_store: Store):
    url = "https://cdn.example/v.mp4"
    older = await ready_job(
        engine_store, "c1", ready_at=START_TIME, render_key="rk", download_url=url
    )
    newer = await ready_job(
        engine_store, "c2", ready_at=START_TIME + 10, render_key="rk", download_url=url
    )
    # A reuse of a reuse, a job without a URL, another key: never a cache entry.
    await ready_job(
        engine_store,
        "c3",
        ready_at=START_TIME + 20,
        render_key="rk",
        download_url=url,
        reused_from=newer,
    )
    await ready_job(engine_store, "c4", ready_at=START_TIME + 30, render_key="rk")
    await ready_job(
        engine_store, "c5", ready_at=START_TIME + 40, render_key="other", download_url=url
    )

    hit = await engine_store.cached_render("rk", START_TIME)
    assert hit is not None
    assert (hit.job_id, hit.render_key, hit.reused_from) == (newer, "rk", None)
    assert (await engine_store.cached_render("rk", START_TIME + 11)) is None
    assert (await engine_store.cached_render("missing", 0.0)) is None
    assert (await engine_store.get_job(older)).render_key == "rk"
