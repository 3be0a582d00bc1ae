"""What only the PostgreSQL engine promises: versioned migrations, and several instances on one
database (each a PostgresStore of its own, with its own pool) that never both win."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import psycopg
import pytest

from service.model import JobState, JobUpdate, NewOutboxMessage, SpendCap
from service.store.base import FencedError, Store, StoreUnavailableError
from service.store.postgres import PostgresStore, SchemaTooNewError
from service.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE
from tests.support.fakes import FakeClock
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

M, S = JobState.MAPPED, JobState.SUBMITTING
IN_FLIGHT = {S, JobState.SUBMITTED, JobState.RECONCILE}


@pytest.fixture
async def two_instances(postgres_url, store_clock):
    first = PostgresStore(postgres_url, clock=store_clock)
    second = PostgresStore(postgres_url, clock=store_clock)
    async with anyio.create_task_group() as tg:  # started together: the migration runs once
        tg.start_soon(first.open)
        tg.start_soon(second.open)
    yield first, second
    await first.close()
    await second.close()


def recorded_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT version FROM studiohook_schema").fetchone()
    assert row is not None
    return int(row[0])


async def test_schema_is_created_at_start_and_its_version_recorded(postgres_url):
    store = PostgresStore(postgres_url)
    await store.open()
    await store.close()
    assert recorded_version(postgres_url) == SCHEMA_VERSION
    again = PostgresStore(postgres_url)  # an up-to-date schema opens without migrating
    await again.open()
    await again.ping()
    await again.close()


async def test_a_newer_schema_is_refused_and_left_alone(postgres_url):
    store = PostgresStore(postgres_url)
    await store.open()
    await store.accept_event(sample_event("kept"), [])
    await store.close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE studiohook_schema SET version = %s", (SCHEMA_VERSION + 1,))

    newer = PostgresStore(postgres_url)
    with pytest.raises(SchemaTooNewError, match="newer than this studiohook knows"):
        await newer.open()
    assert isinstance(SchemaTooNewError("x"), StoreUnavailableError)
    assert recorded_version(postgres_url) == SCHEMA_VERSION + 1
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)


async def test_an_unreachable_server_is_store_unavailable():
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout_s=2)
    with pytest.raises(StoreUnavailableError, match="cannot open"):
        await store.open()


async def test_one_delivery_retried_to_every_instance_is_stored_once(two_instances):
    first, second = two_instances
    event = sample_event("k1")
    job = sample_job(event)
    answers = []

    async def deliver(store):
        answers.append(await store.accept_event(event, [job]))

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(deliver, (first, second)[n % 2])
    assert sum(not a.duplicate for a in answers) == 1
    assert {a.job_ids for a in answers} == {(job.job_id,)}
    assert (await second.count_jobs_by_state())[JobState.RECEIVED] == 1
    assert len(await first.job_history(job.job_id)) == 1


async def test_instances_claiming_together_split_the_work_without_overlap(two_instances):
    first, second = two_instances
    job_ids = []
    for n in range(40):
        event = sample_event(f"k{n}")
        job = sample_job(event)
        await first.accept_event(event, [job])
        await first.transition(job.job_id, {JobState.RECEIVED}, M)
        job_ids.append(job.job_id)
    claimed: dict[str, list[str]] = {"w1": [], "w2": []}

    async def drain(store, owner):
        while batch := await store.claim_jobs(
            {M}, owner=owner, lease_s=30, limit=3, take_own=False
        ):
            claimed[owner] += [j.job_id for j in batch]

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, first, "w1")
        tg.start_soon(drain, second, "w2")
    assert sorted(claimed["w1"] + claimed["w2"]) == sorted(job_ids)
    assert not set(claimed["w1"]) & set(claimed["w2"])
    for job_id in job_ids:
        assert (await first.get_job(job_id)).fence == 1


async def test_an_instance_whose_lease_was_taken_over_cannot_move_the_job(
    two_instances, store_clock: FakeClock
):
    first, second = two_instances
    event = sample_event("k1")
    job = sample_job(event)
    await first.accept_event(event, [job])
    await first.transition(job.job_id, {JobState.RECEIVED}, M)
    await first.transition(job.job_id, {M}, S)
    mine = await first.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=5)
    assert await second.claim_jobs(IN_FLIGHT, owner="w2", lease_s=5, limit=5, take_own=False) == []
    store_clock.advance(5)
    [taken] = await second.claim_jobs(IN_FLIGHT, owner="w2", lease_s=5, limit=5, take_own=False)
    assert taken.fence == mine.fence + 1

    with pytest.raises(FencedError):
        await first.transition(
            job.job_id, {S}, JobState.SUBMITTED, JobUpdate(project_id="p1"), fence=mine.fence
        )
    with pytest.raises(FencedError):
        await first.update_job(job.job_id, JobUpdate(progress=50.0), fence=mine.fence)
    moved = await second.transition(
        job.job_id, {S}, JobState.SUBMITTED, JobUpdate(project_id="p2"), fence=taken.fence
    )
    assert (moved.project_id, moved.owner, moved.progress) == ("p2", "w2", 0.0)


async def test_an_idle_instance_is_woken_by_work_another_instance_commits(two_instances):
    first, second = two_instances
    new_jobs, announcements = anyio.Event(), anyio.Event()
    second.add_work_listener(new_jobs.set)
    second.add_outbox_listener(announcements.set)
    event = sample_event("k1")
    job = sample_job(event)
    async with anyio.create_task_group() as tg:
        await tg.start(second.listen)
        assert not new_jobs.is_set()
        await first.accept_event(event, [job])
        with anyio.fail_after(5):
            await new_jobs.wait()
        assert not announcements.is_set()
        await first.transition(job.job_id, {JobState.RECEIVED}, M)
        await first.transition(
            job.job_id,
            {M},
            JobState.FAILED,
            None,
            [
                NewOutboxMessage(
                    target="mqtt",
                    event_type="video.failed",
                    payload=b"{}",
                    export_name=job.export_name,
                )
            ],
        )
        with anyio.fail_after(5):
            await announcements.wait()
        tg.cancel_scope.cancel()


async def failed_with_announcement(store, key):
    event = sample_event(key)
    job = sample_job(event)
    await store.accept_event(event, [job])
    await store.transition(job.job_id, {JobState.RECEIVED}, M)
    message = NewOutboxMessage(
        target="hook", event_type="video.failed", payload=b"{}", export_name=job.export_name
    )
    await store.transition(job.job_id, {M}, JobState.FAILED, None, [message])
    return job


@asynccontextmanager
async def claimants(
    url: str, clock: FakeClock, lease_s: float
) -> AsyncIterator[tuple[Store, Store]]:
    """Instances `a` and `b` on one database, claiming outbox rows for `lease_s`."""
    first = PostgresStore(url, clock=clock, outbox_claimant="a", outbox_lease_s=lease_s)
    second = PostgresStore(url, clock=clock, outbox_claimant="b", outbox_lease_s=lease_s)
    await first.open()
    try:
        await second.open()
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def test_one_announcement_is_sent_by_one_instance_until_its_claim_ends(
    postgres_url, store_clock
):
    async with claimants(postgres_url, store_clock, lease_s=30) as (first, second):
        job = await failed_with_announcement(first, "k1")
        now = store_clock()
        [mine] = await first.due_outbox(now)
        assert mine.job_id == job.job_id
        assert await second.due_outbox(now + 29) == []  # first is sending it
        assert [m.id for m in await first.due_outbox(now + 29)] == [mine.id]  # renewed
        assert await second.due_outbox(now + 58) == []
        [taken] = await second.due_outbox(now + 59)  # first went quiet: its claim ended
        assert taken.id == mine.id

        await second.outbox_retry(taken.id, now + 70, "503 from target")  # releases the claim
        [again] = await first.due_outbox(now + 70)
        assert (again.id, again.attempts) == (mine.id, 1)
        await first.outbox_delivered(again.id)
        assert await second.due_outbox(now + 1000) == []
        assert await first.due_outbox(now + 1000) == []


async def test_an_announcement_being_sent_stays_claimed_while_its_sender_renews_it(
    postgres_url, store_clock
):
    async with claimants(postgres_url, store_clock, lease_s=6) as (first, second):
        job = await failed_with_announcement(first, "k1")
        now = store_clock()
        [mine] = await first.due_outbox(now)
        assert await second.due_outbox(now + 5.9) == []
        await first.renew_outbox_claims({mine.id}, now + 4)  # a third of it, twice over
        await first.renew_outbox_claims({mine.id}, now + 8)
        assert await second.due_outbox(now + 13.9) == []  # the slow delivery keeps its claim
        [taken] = await second.due_outbox(now + 14)  # first stopped renewing: it died
        assert (taken.id, taken.job_id) == (mine.id, job.job_id)

        await first.renew_outbox_claims({mine.id}, now + 15)  # too late: b holds it now
        assert await first.due_outbox(now + 16) == []
        await second.outbox_delivered(taken.id)
        await second.renew_outbox_claims({taken.id}, now + 17)  # finished rows stay finished
        assert await first.outbox_pending_for_job(job.job_id) == 0


async def test_a_version_1_database_gains_the_guard_rails_and_keeps_its_jobs(postgres_url):
    with psycopg.connect(postgres_url) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute(VERSION_TABLE)
        conn.execute("INSERT INTO studiohook_schema (id, version) VALUES (1, 1)")
        event_row = conn.execute(
            "INSERT INTO events (source, dedupe_key, event_id, event_type, body, headers,"
            " received_at, status) VALUES ('shop', 'old', 'evt-old', 't', '', '', 0, 'routed')"
            " RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO jobs (job_id, event_row, source, route, state, export_name,"
            " created_at, updated_at) VALUES ('old-job', %s, 'shop', 'r', 'mapped', 'sh-old',"
            " 0, 0)",
            (event_row,),
        )
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        assert recorded_version(postgres_url) == SCHEMA_VERSION
        job = await store.get_job("old-job")
        assert job is not None
        assert (job.state, job.render_key, job.coalesce_key) == (M, None, None)
        spent = await store.spend_or_hold("old-job", (), JobUpdate(render_key="rk"), _no_rows)
        assert (spent.state, spent.render_key) == (S, "rk")
        assert await store.spend_counts(0.0) == {"r": 1}
    finally:
        await store.close()


def _no_rows(_job, _cap):
    return []


async def test_two_instances_paying_together_never_overshoot_a_cap(two_instances):
    first, second = two_instances
    ids = []
    for i in range(24):
        event = sample_event(f"pay-{i}")
        new = sample_job(event)
        await first.accept_event(event, [new])
        await first.transition(new.job_id, {JobState.RECEIVED}, M, JobUpdate(export_body=b"{}"))
        ids.append(new.job_id)
    cap = SpendCap("day:two", 0.0, 3)
    states: list[JobState] = []

    async def pay(store: PostgresStore, job_id: str) -> None:
        states.append((await store.spend_or_hold(job_id, [cap], JobUpdate(), _no_rows)).state)

    async with anyio.create_task_group() as tg:
        for i, job_id in enumerate(ids):
            tg.start_soon(pay, (first, second)[i % 2], job_id)
    assert states.count(S) == 3
    assert states.count(JobState.HELD) == 21
    assert await second.spend_counts(0.0) == {"new-product": 3}
