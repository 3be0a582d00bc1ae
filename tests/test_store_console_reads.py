"""The store's read-only queries for the operator console, on every engine in ENGINES."""

from __future__ import annotations

import pytest

from service.model import EventStatus, JobState, JobUpdate, NewOutboxMessage
from tests.support.store_fixtures import START_TIME, sample_event, sample_job

pytestmark = pytest.mark.anyio

M, S, SUB = JobState.MAPPED, JobState.SUBMITTING, JobState.SUBMITTED


async def accept(store, key, routes=("new-product",), *, source="shop", received_at=START_TIME):
    event = sample_event(key, source=source, received_at=received_at)
    jobs = [sample_job(event, route) for route in routes]
    await store.accept_event(event, jobs)
    return [j.job_id for j in jobs]


async def submit(store, job_id):
    await store.transition(job_id, {JobState.RECEIVED}, M)
    await store.transition(job_id, {M}, S)
    await store.transition(job_id, {S}, SUB)


async def test_list_jobs_by_source_and_creation_time(engine_store, store_clock):
    [old] = await accept(engine_store, "k0", source="shop")
    store_clock.advance(100)
    [new_shop] = await accept(engine_store, "k1", source="shop")
    [device] = await accept(engine_store, "k2", source="devices")

    assert [j.job_id for j in await engine_store.list_jobs(source="shop")] == [new_shop, old]
    since = START_TIME + 50
    recent = await engine_store.list_jobs(created_since=since)
    assert [j.job_id for j in recent] == [device, new_shop]
    assert [
        j.job_id for j in await engine_store.list_jobs(source="devices", created_since=since)
    ] == [device]


async def test_events_listed_newest_first_by_status_with_their_jobs(engine_store):
    [job] = await accept(engine_store, "k0")
    await engine_store.accept_event(sample_event("k1"), [])
    await engine_store.reject_event(sample_event("k2", source="devices"), "payload is not JSON")

    events = await engine_store.list_events()
    assert [e.event_id for e in events] == ["evt-k2", "evt-k1", "evt-k0"]
    [dead] = await engine_store.list_events(status=EventStatus.DEAD_LETTERED)
    assert (dead.reason, dead.source) == ("payload is not JSON", "devices")
    assert [e.event_id for e in await engine_store.list_events(source="shop")] == [
        "evt-k1",
        "evt-k0",
    ]
    assert [e.event_id for e in await engine_store.list_events(limit=1, cursor=events[0].id)] == [
        "evt-k1"
    ]
    assert await engine_store.count_events_by_status() == {
        EventStatus.ROUTED: 1,
        EventStatus.IGNORED: 1,
        EventStatus.DEAD_LETTERED: 1,
    }
    assert [j.job_id for j in await engine_store.jobs_of_event(events[2].id)] == [job]
    assert await engine_store.jobs_of_event(events[1].id) == []


async def test_announcements_of_a_job_with_their_delivery_record(engine_store, store_clock):
    [job_id] = await accept(engine_store, "k0")
    await submit(engine_store, job_id)
    job = await engine_store.get_job(job_id)
    rows = [
        NewOutboxMessage(target, "video.ready", b"{}", job.export_name)
        for target in ("bus", "hook")
    ]
    await engine_store.transition(job_id, {SUB}, JobState.READY, outbox=rows)
    store_clock.advance(5)
    bus, hook = (a.message for a in await engine_store.job_announcements(job_id))
    await engine_store.outbox_delivered(bus.id)
    await engine_store.outbox_retry(hook.id, START_TIME + 60, "503 from receiver")
    await engine_store.outbox_dead(hook.id, "410 Gone")

    delivered, dead = await engine_store.job_announcements(job_id)
    assert (delivered.message.target, delivered.message.status) == ("bus", "delivered")
    assert delivered.created_at == START_TIME
    assert delivered.delivered_at == START_TIME + 5
    assert (dead.message.status, dead.message.attempts, dead.message.last_error) == (
        "dead",
        2,
        "410 Gone",
    )
    assert dead.delivered_at is None
    assert await engine_store.count_outbox_by_status() == {"pending": 0, "delivered": 1, "dead": 1}


async def test_activity_exports_and_route_counts(engine_store, store_clock):
    [a] = await accept(engine_store, "k0", ("promo",), received_at=START_TIME - 30)
    [b, c] = await accept(engine_store, "k1", ("promo", "teaser"), received_at=START_TIME + 70)
    await submit(engine_store, a)
    await submit(engine_store, b)
    await engine_store.transition(b, {SUB}, JobState.READY, JobUpdate(ready_at=START_TIME + 75))
    await engine_store.transition(c, {JobState.RECEIVED}, JobState.REJECTED)

    minutes = await engine_store.activity_per_minute(START_TIME - 3600)
    first_minute = (START_TIME - 30) // 60 * 60
    assert [(m.minute, m.events, m.videos) for m in minutes] == [
        (first_minute, 1, 0),
        ((START_TIME + 70) // 60 * 60, 1, 1),
    ]
    assert await engine_store.activity_per_minute(START_TIME) == [minutes[1]]
    assert await engine_store.exports_by_route(START_TIME - 1) == {"promo": 2}
    assert await engine_store.exports_by_route(START_TIME + 1) == {}
    assert await engine_store.count_jobs_by_route() == {
        "promo": {JobState.SUBMITTED: 1, JobState.READY: 1},
        "teaser": {JobState.REJECTED: 1},
    }
