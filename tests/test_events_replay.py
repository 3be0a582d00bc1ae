"""Replaying stored events through the configuration of the day, on a real SQLite store.

A replay is idempotent per event and route: it creates only the jobs that do not exist, and a
deliberate `rerender` starts a new round (new export name) of a job whose video exists.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from service.catalog import load_catalog
from service.config import Config, load_config
from service.intake import StoreIntake
from service.model import EventStatus, JobState, JobUpdate, RawEvent
from service.store.schema import MIGRATIONS
from service.store.sqlite import SQLiteStore
from tests.support.service_fixtures import TEMPLATE
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

BROKEN = "length(id)"
FIXED = "id"


def config(tmp_path: Path, dedupe: str, when: str = "true") -> Config:
    path = tmp_path / f"config-{abs(hash((dedupe, when)))}.toml"
    path.write_text(
        f"""
[[sources]]
name = "feed"
kind = "json"
dedupe_key = "{dedupe}"

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "promo-video"
source = "feed"
template = "promo"
when = "{when}"

[routes.patches]
"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "{{{{ product.title }}}}"
"""
    )
    return load_config(path, env={})


async def intake_for(cfg: Config, store: SQLiteStore) -> StoreIntake:
    catalog, problems = await load_catalog(cfg)
    assert problems == []
    return StoreIntake(store, catalog, sources=cfg.sources)


async def deliver(intake: StoreIntake, cfg: Config, payload: object):
    body = orjson.dumps(payload)
    raw = RawEvent(source="feed", payload=payload, headers={"x-trace": "t1"})
    return await intake.accept(cfg.sources[0], raw, body)


async def dead_letter_row(store: SQLiteStore, event_id: str) -> int:
    (row,) = await store.list_events(event_id=event_id)
    return row.id


async def test_a_replay_after_the_fix_turns_a_dead_letter_into_one_job(tmp_path, store):
    broken = config(tmp_path, BROKEN)
    acceptance = await deliver(await intake_for(broken, store), broken, {"id": 5, "title": "Lamp"})
    assert acceptance.status is EventStatus.DEAD_LETTERED
    row = await dead_letter_row(store, acceptance.event_id)

    fixed = config(tmp_path, FIXED)
    intake = await intake_for(fixed, store)
    first = await intake.replay(row)
    (job,) = first.jobs
    assert job.created
    assert first.event.status is EventStatus.ROUTED
    assert first.event.reason is None
    assert first.event.failed_step is None
    assert first.event.dedupe_key == "j:5"
    assert first.event.event_id == "5"
    assert first.event.replays == 1
    stored_job = await store.get_job(job.job_id)
    assert stored_job.state is JobState.RECEIVED
    assert stored_job.event_row == row

    again = await intake.replay(row)
    assert [(j.job_id, j.created) for j in again.jobs] == [(job.job_id, False)]
    assert await store.count_jobs_by_state() == {**dict.fromkeys(JobState, 0), JobState.RECEIVED: 1}

    # The fixed key now dedupes a redelivery of the same event onto the replayed row.
    redelivered = await deliver(intake, fixed, {"id": 5, "title": "Lamp"})
    assert redelivered.duplicate
    assert redelivered.job_ids == (job.job_id,)


async def test_a_replay_that_still_fails_stays_a_dead_letter_with_the_new_reason(tmp_path, store):
    broken = config(tmp_path, BROKEN)
    intake = await intake_for(broken, store)
    acceptance = await deliver(intake, broken, {"id": 5})
    row = await dead_letter_row(store, acceptance.event_id)
    still = config(tmp_path, FIXED, when="product.title.startswith('L')")
    result = await (await intake_for(still, store)).replay(row)
    assert result.jobs == ()
    assert result.event.status is EventStatus.DEAD_LETTERED
    assert result.event.failed_step == "routes.promo-video.when"
    assert result.event.replays == 1
    assert await store.jobs_in_states(set(JobState)) == []


async def test_a_dead_letter_whose_event_came_again_meanwhile_is_that_event(tmp_path, store):
    broken = config(tmp_path, BROKEN)
    dead = await deliver(await intake_for(broken, store), broken, {"id": 7, "title": "Mug"})
    row = await dead_letter_row(store, dead.event_id)
    fixed = config(tmp_path, FIXED)
    intake = await intake_for(fixed, store)
    accepted = await deliver(intake, fixed, {"id": 7, "title": "Mug", "note": "resent"})
    assert accepted.status is EventStatus.ROUTED

    result = await intake.replay(row)
    assert result.duplicate_of is not None
    assert [(j.job_id, j.created) for j in result.jobs] == [(accepted.job_ids[0], False)]
    assert result.event.status is EventStatus.IGNORED
    assert result.event.reason == f"same event as #{result.duplicate_of}"
    assert len(await store.jobs_in_states(set(JobState))) == 1


async def notified(store: SQLiteStore, job_id: str) -> None:
    path = [
        (JobState.RECEIVED, JobState.MAPPED),
        (JobState.MAPPED, JobState.SUBMITTING),
        (JobState.SUBMITTING, JobState.SUBMITTED),
        (JobState.SUBMITTED, JobState.READY),
        (JobState.READY, JobState.NOTIFIED),
    ]
    for before, after in path:
        update = JobUpdate(project_id="p1") if after is JobState.SUBMITTED else None
        await store.transition(job_id, {before}, after, update)


async def test_rerender_starts_a_new_round_only_when_asked(tmp_path, store):
    cfg = config(tmp_path, FIXED)
    intake = await intake_for(cfg, store)
    acceptance = await deliver(intake, cfg, {"id": 9, "title": "Desk"})
    (job_id,) = acceptance.job_ids
    await notified(store, job_id)
    before = await store.get_job(job_id)
    row = await dead_letter_row(store, acceptance.event_id)

    plain = await intake.replay(row)
    assert [(j.state, j.created, j.rerendered) for j in plain.jobs] == [
        (JobState.NOTIFIED, False, False)
    ]
    assert (await store.get_job(job_id)).state is JobState.NOTIFIED

    rerendered = await intake.replay(row, rerender=True)
    assert [(j.state, j.rerendered) for j in rerendered.jobs] == [(JobState.RECEIVED, True)]
    after = await store.get_job(job_id)
    assert after.state is JobState.RECEIVED
    assert after.export_name != before.export_name
    assert after.export_name.startswith(before.export_name)
    assert after.project_id is None
    history = [t.to_state for t in await store.job_history(job_id)]
    assert history[-2:] == [JobState.NOTIFIED, JobState.RECEIVED]

    # A job still on its way is never restarted, even with rerender.
    again = await intake.replay(row, rerender=True)
    assert [(j.state, j.rerendered) for j in again.jobs] == [(JobState.RECEIVED, False)]


async def test_replaying_a_row_that_does_not_exist_is_a_lookup_error(tmp_path, store):
    cfg = config(tmp_path, FIXED)
    with pytest.raises(LookupError):
        await (await intake_for(cfg, store)).replay(12345)


async def test_list_events_filters_by_status_source_and_time_newest_first_in_pages(store):
    for i in range(5):
        event = sample_event(f"k{i}", source="shop" if i % 2 else "cms", received_at=1000.0 + i)
        if i < 3:
            await store.reject_event(event, f"bad {i}")
        else:
            await store.accept_event(event, [sample_job(event)])
    dead = await store.list_events(status=EventStatus.DEAD_LETTERED)
    assert [e.dedupe_key for e in dead] == ["k2", "k1", "k0"]
    assert all(e.reason and e.status is EventStatus.DEAD_LETTERED for e in dead)
    assert [e.dedupe_key for e in await store.list_events(source="shop")] == ["k3", "k1"]
    assert [e.dedupe_key for e in await store.list_events(since=1003.0)] == ["k4", "k3"]
    page = await store.list_events(limit=2)
    following = await store.list_events(limit=2, cursor=page[-1].id)
    assert [e.dedupe_key for e in page + following] == ["k4", "k3", "k2", "k1"]
    assert [e.dedupe_key for e in await store.list_events(event_id="evt-k3")] == ["k3"]


def test_migration_2_renames_rejected_events_to_dead_letters(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO events (source, dedupe_key, event_id, event_type, body, headers,"
        " received_at, status, reason) VALUES ('s', 'k', 'e', 't', x'00', '{}', 1, 'rejected',"
        " 'payload is not JSON')"
    )
    db.commit()
    db.close()

    import anyio  # noqa: PLC0415

    async def read() -> list:
        store = SQLiteStore(path)
        await store.open()
        try:
            return await store.list_events(status=EventStatus.DEAD_LETTERED)
        finally:
            await store.close()

    (event,) = anyio.run(read)
    assert event.reason == "payload is not JSON"
    assert event.replays == 0
