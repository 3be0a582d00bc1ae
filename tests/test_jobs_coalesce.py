"""Coalescing in the store: one transaction maps the newest job and supersedes the waiting ones."""

import anyio
import orjson
import pytest

from service.config import NotifyConfig
from service.model import ALLOWED_TRANSITIONS, JobState, JobUpdate
from service.notify.payload import outbox_rows
from service.store.base import Store
from tests.support.jobs_fixtures import outbox_for
from tests.support.store_fixtures import sample_event, sample_job

S = JobState
pytestmark = pytest.mark.anyio


def announce(job):
    return outbox_for(job, "video.superseded")


def mapped_update(key="r:42"):
    return JobUpdate(export_body=b"{}", api="v3", coalesce_key=key, next_attempt_at=1e12)


async def received(store, key):
    event = sample_event(key)
    new = sample_job(event)
    await store.accept_event(event, [new])
    return new.job_id


def test_only_waiting_jobs_can_be_superseded():
    sources = {s for s, targets in ALLOWED_TRANSITIONS.items() if S.SUPERSEDED in targets}
    assert sources == {S.RECEIVED, S.MAPPED, S.HELD}
    assert ALLOWED_TRANSITIONS[S.SUPERSEDED] == frozenset()


async def test_the_newest_job_supersedes_waiting_ones_but_never_a_submitted_one(
    engine_store: Store,
):
    store = engine_store
    submitted = await received(store, "e0")
    await store.map_coalesced(submitted, mapped_update(), announce)
    await store.spend_or_hold(submitted, (), JobUpdate(attempts=1), lambda _j, _c: [])
    first = await received(store, "e1")
    second = await received(store, "e2")
    third = await received(store, "e3")
    other_key = await received(store, "e4")
    await store.map_coalesced(first, mapped_update(), announce)
    await store.map_coalesced(third, mapped_update(), announce)
    # Mapped after a newer job of its key: superseded by it straight away.
    late = await store.map_coalesced(second, mapped_update(), announce)
    assert (late.state, late.superseded_by) == (S.SUPERSEDED, third)
    await store.map_coalesced(other_key, mapped_update("r:7"), announce)
    states = {j: (await store.get_job(j)).state for j in (submitted, first, third, other_key)}
    assert states == {
        submitted: S.SUBMITTING,
        first: S.SUPERSEDED,
        third: S.MAPPED,
        other_key: S.MAPPED,
    }
    assert (await store.get_job(first)).superseded_by == third
    rows = await store.due_outbox(1e12, 100)
    assert sorted(r.job_id for r in rows if r.event_type == "video.superseded") == sorted(
        [first, second]
    )


async def test_jobs_of_one_key_mapped_side_by_side_leave_exactly_the_newest(
    engine_store: Store,
):
    store = engine_store
    ids = [await received(store, f"side-{i}") for i in range(16)]

    async def map_one(job_id: str) -> None:
        await store.map_coalesced(job_id, mapped_update("r:side"), announce)

    async with anyio.create_task_group() as tg:
        for job_id in reversed(ids):
            tg.start_soon(map_one, job_id)
    jobs = [await store.get_job(job_id) for job_id in ids]
    assert [j.state for j in jobs] == [S.SUPERSEDED] * 15 + [S.MAPPED]
    assert {j.superseded_by for j in jobs[:-1]} == {ids[-1]}


async def test_superseded_by_names_the_job_that_renders_never_a_superseded_one(
    engine_store: Store,
):
    store = engine_store
    first, second, third = [await received(store, f"chain-{i}") for i in range(3)]
    target = NotifyConfig(name="file", kind="file")

    def announce_for_real(job):
        return outbox_rows(job, "video.superseded", [target])

    for job_id in (first, second, third):
        await store.map_coalesced(job_id, mapped_update("r:chain"), announce_for_real)
    jobs = {j: await store.get_job(j) for j in (first, second, third)}
    assert [jobs[j].state for j in (first, second, third)] == [S.SUPERSEDED, S.SUPERSEDED, S.MAPPED]
    assert jobs[first].superseded_by == third
    assert jobs[second].superseded_by == third
    # Each announcement named the newest job of its moment; following them ends at the third.
    rows = await store.due_outbox(1e12, 100)
    named = {
        r.job_id: orjson.loads(r.payload)["superseded_by"]
        for r in rows
        if r.event_type == "video.superseded"
    }
    assert named == {first: second, second: third}
