"""The Store contract, written against the Protocol and run on every engine in ENGINES."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest

from service.jobs.retry import retry_update
from service.model import (
    EventStatus,
    JobState,
    JobUpdate,
    NewOutboxMessage,
    Transition,
)
from service.store.base import (
    FencedError,
    StaleTransitionError,
    Store,
    StoreUnavailableError,
    UnknownJobError,
)
from service.store.factory import store_from_url
from tests.support.store_fixtures import START_TIME, sample_event, sample_job

pytestmark = pytest.mark.anyio

R, M, S = JobState.RECEIVED, JobState.MAPPED, JobState.SUBMITTING


def ready_message(export_name: str, target: str = "mqtt") -> NewOutboxMessage:
    return NewOutboxMessage(
        target=target,
        event_type="video.ready",
        payload=b'{"type":"ready"}',
        export_name=export_name,
    )


def failed_message(export_name: str, target: str = "mqtt") -> NewOutboxMessage:
    return NewOutboxMessage(
        target=target,
        event_type="video.failed",
        payload=f'{{"round":"{export_name}"}}'.encode(),
        export_name=export_name,
    )


async def accept(store, key: str, routes: tuple[str, ...] = ("new-product",)):
    event = sample_event(key)
    jobs = [sample_job(event, route) for route in routes]
    acceptance = await store.accept_event(event, jobs)
    return acceptance, jobs


WAY_TO = {
    JobState.FAILED: (M,),
    JobState.IGNORED: (),
    JobState.NOTIFIED: (M, S, JobState.SUBMITTED, JobState.READY),
}
"""The states a job passes through before reaching each end state (store tests skip the API)."""


async def walk(store, job_id: str, *states: JobState) -> None:
    current = (await store.get_job(job_id)).state
    for state in states:
        await store.transition(job_id, {current}, state)
        current = state


# --- intake -----------------------------------------------------------------------------


async def test_accept_commits_event_jobs_and_first_transition(engine_store):
    event = sample_event("k1")
    job = sample_job(event)
    acceptance = await engine_store.accept_event(event, [job])

    assert acceptance.event_id == "evt-k1"
    assert acceptance.job_ids == (job.job_id,)
    assert not acceptance.duplicate
    assert acceptance.status is EventStatus.ROUTED
    stored_job = await engine_store.get_job(job.job_id)
    assert stored_job.state is JobState.RECEIVED
    assert (stored_job.route, stored_job.export_name) == ("new-product", job.export_name)
    assert stored_job.created_at == stored_job.updated_at == START_TIME
    assert stored_job.event_id == "evt-k1"
    stored_event = await engine_store.get_event(stored_job.event_row)
    assert stored_event.body == event.body
    assert dict(stored_event.headers) == {"x-shopify-topic": "products/create"}
    assert (stored_event.source, stored_event.dedupe_key) == ("shop", "k1")
    assert stored_event.status is EventStatus.ROUTED
    assert await engine_store.get_event(stored_job.event_row + 1000) is None
    assert await engine_store.job_history(job.job_id) == [
        Transition(job.job_id, None, JobState.RECEIVED, START_TIME)
    ]


async def test_duplicate_returns_original_ids_and_writes_nothing(engine_store):
    first, jobs = await accept(engine_store, "k1", ("a", "b"))
    again = sample_event("k1")
    other_job = sample_job(again, "c")
    duplicate = await engine_store.accept_event(replace(again, event_id="evt-other"), [other_job])

    assert duplicate.duplicate
    assert duplicate.event_id == first.event_id == "evt-k1"
    assert duplicate.job_ids == first.job_ids == tuple(j.job_id for j in jobs)
    assert await engine_store.get_job(other_job.job_id) is None
    counts = await engine_store.count_jobs_by_state()
    assert counts[JobState.RECEIVED] == 2


async def test_duplicate_is_recognised_after_restart(engine_store, store_engine):
    first, _ = await accept(engine_store, "k1")
    await engine_store.close()
    reopened = store_engine.make()
    await reopened.open()
    try:
        again, _ = await accept(reopened, "k1")
    finally:
        await reopened.close()
    assert again.duplicate
    assert again.job_ids == first.job_ids


async def test_same_key_from_another_source_is_a_new_event(engine_store):
    await accept(engine_store, "k1")
    other = sample_event("k1", source="woo")
    acceptance = await engine_store.accept_event(other, [sample_job(other)])
    assert not acceptance.duplicate


async def test_event_without_jobs_is_ignored(engine_store):
    acceptance, _ = await accept(engine_store, "k1", ())
    assert acceptance.status is EventStatus.IGNORED
    assert acceptance.job_ids == ()
    assert not acceptance.duplicate


async def test_reject_event_keeps_reason_and_dedupes(engine_store):
    rejected = await engine_store.reject_event(sample_event("bad"), "body is not JSON")
    assert rejected.status is EventStatus.DEAD_LETTERED
    assert not rejected.duplicate

    again = await engine_store.reject_event(sample_event("bad"), "still not JSON")
    assert again.duplicate
    accepted_later, _ = await accept(engine_store, "bad")
    assert accepted_later.duplicate
    assert accepted_later.status is EventStatus.DEAD_LETTERED
    assert accepted_later.job_ids == ()


# --- transitions ------------------------------------------------------------------------


async def test_transition_moves_state_updates_fields_and_records_note(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    store_clock.advance(5)
    moved = await engine_store.transition(
        job.job_id, {R}, M, JobUpdate(export_body=b"{}", api="legacy", note="mapped ok")
    )

    assert moved.state is M
    assert (moved.export_body, moved.api) == (b"{}", "legacy")
    assert moved.updated_at == START_TIME + 5
    assert moved.created_at == START_TIME
    assert moved.progress == 0.0  # None fields of the update leave columns alone
    assert await engine_store.get_job(job.job_id) == moved
    history = await engine_store.job_history(job.job_id)
    assert history[-1] == Transition(job.job_id, R, M, START_TIME + 5, "mapped ok")


async def test_map_jobs_moves_a_batch_in_one_go_and_skips_jobs_already_moved(
    engine_store, store_clock
):
    jobs = [(await accept(engine_store, f"k{n}"))[1][0] for n in range(3)]
    first, moved_away, last = jobs
    await engine_store.transition(moved_away.job_id, {R}, JobState.REJECTED)
    store_clock.advance(2)
    moved = await engine_store.map_jobs(
        [
            (first.job_id, JobUpdate(export_body=b'{"a":1}', api="v3")),
            (moved_away.job_id, JobUpdate(export_body=b"{}", api="v3")),
            (last.job_id, JobUpdate(export_body=b'{"c":3}', api="legacy", note="mapped")),
        ]
    )
    assert moved == [first.job_id, last.job_id]
    mapped_first, mapped_last = [await engine_store.get_job(j.job_id) for j in (first, last)]
    assert (mapped_first.state, mapped_first.export_body, mapped_first.api) == (M, b'{"a":1}', "v3")
    assert (mapped_last.state, mapped_last.api) == (M, "legacy")
    assert mapped_last.updated_at == START_TIME + 2
    history = await engine_store.job_history(last.job_id)
    assert history[-1] == Transition(last.job_id, R, M, START_TIME + 2, "mapped")
    assert (await engine_store.get_job(moved_away.job_id)).state is JobState.REJECTED
    assert await engine_store.map_jobs([(first.job_id, JobUpdate(api="v3"))]) == []
    assert await engine_store.map_jobs([]) == []


async def test_get_events_reads_many_rows_and_leaves_out_missing_ones(engine_store):
    jobs = [(await accept(engine_store, f"k{n}"))[1][0] for n in range(3)]
    rows = [(await engine_store.get_job(job.job_id)).event_row for job in jobs]
    events = await engine_store.get_events([*rows, 999_999])
    assert sorted(events) == sorted(rows)
    for row in rows:
        assert events[row] == await engine_store.get_event(row)
    assert await engine_store.get_events([]) == {}


async def test_stale_transition_raises_and_changes_nothing(engine_store):
    _, [job] = await accept(engine_store, "k1")
    with pytest.raises(StaleTransitionError, match="received"):
        await engine_store.transition(
            job.job_id,
            {JobState.SUBMITTED},
            JobState.READY,
            JobUpdate(progress=100.0),
            [ready_message(job.export_name)],
        )
    unchanged = await engine_store.get_job(job.job_id)
    assert (unchanged.state, unchanged.progress) == (R, 0.0)
    assert len(await engine_store.job_history(job.job_id)) == 1
    assert await engine_store.outbox_backlog() == 0


async def test_transition_of_unknown_job_is_stale_and_lookup_error(engine_store):
    with pytest.raises(UnknownJobError, match="does not exist") as caught:
        await engine_store.transition("job_nope", {R}, M)
    assert isinstance(caught.value, StaleTransitionError)
    assert isinstance(caught.value, LookupError)


async def test_concurrent_cas_lets_exactly_one_path_win(engine_store):
    _, [job] = await accept(engine_store, "k1")
    winners: list[JobState] = []

    async def attempt(target: JobState) -> None:
        try:
            await engine_store.transition(job.job_id, {R}, target)
            winners.append(target)
        except StaleTransitionError:
            pass

    async with anyio.create_task_group() as tg:
        for target in (M, JobState.IGNORED, JobState.REJECTED, M):
            tg.start_soon(attempt, target)
    assert len(winners) == 1
    assert (await engine_store.get_job(job.job_id)).state is winners[0]
    assert len(await engine_store.job_history(job.job_id)) == 2


async def test_failed_cas_does_not_roll_back_concurrent_requests(engine_store):
    jobs = []
    for n in range(6):
        _, [job] = await accept(engine_store, f"k{n}")
        jobs.append(job)
    results: dict[str, object] = {}

    async def move(job_id: str, from_state: JobState) -> None:
        try:
            results[job_id] = await engine_store.transition(job_id, {from_state}, M)
        except StaleTransitionError as exc:
            results[job_id] = exc

    async with anyio.create_task_group() as tg:
        for n, job in enumerate(jobs):
            tg.start_soon(move, job.job_id, R if n % 2 == 0 else S)
    for n, job in enumerate(jobs):
        state = (await engine_store.get_job(job.job_id)).state
        if n % 2 == 0:
            assert state is M
        else:
            assert isinstance(results[job.job_id], StaleTransitionError)
            assert state is R


async def test_history_lists_every_transition_in_order(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    path = [M, S, JobState.SUBMITTED, JobState.READY, JobState.NOTIFIED]
    for state in path:
        store_clock.advance(1)
        await walk(engine_store, job.job_id, state)
    history = await engine_store.job_history(job.job_id)
    assert [t.to_state for t in history] == [R, *path]
    assert [t.from_state for t in history] == [None, R, *path[:-1]]
    assert [t.at for t in history] == [START_TIME + n for n in range(6)]
    assert await engine_store.job_history("job_nope") == []


async def test_update_job_changes_fields_without_history(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    store_clock.advance(3)
    updated = await engine_store.update_job(job.job_id, JobUpdate(progress=42.5, polls=3))
    assert (updated.state, updated.progress, updated.polls) == (R, 42.5, 3)
    assert updated.updated_at == START_TIME + 3
    assert len(await engine_store.job_history(job.job_id)) == 1
    with pytest.raises(UnknownJobError):
        await engine_store.update_job("job_nope", JobUpdate(polls=1))


async def test_update_can_rename_and_clear_fields(engine_store):
    _, [job] = await accept(engine_store, "k1")
    await engine_store.update_job(
        job.job_id, JobUpdate(project_id="p1", error_code="boom", error_message="bad")
    )
    retried = await engine_store.transition(
        job.job_id,
        {R},
        M,
        JobUpdate(export_name="renamed/r1", clear=frozenset({"error_code", "error_message"})),
    )
    assert retried.export_name == "renamed/r1"
    assert (retried.error_code, retried.error_message, retried.project_id) == (None, None, "p1")


async def test_update_rejects_clearing_required_or_conflicting_fields(engine_store):
    _, [job] = await accept(engine_store, "k1")
    with pytest.raises(ValueError, match="polls"):
        await engine_store.update_job(job.job_id, JobUpdate(clear=frozenset({"polls"})))
    with pytest.raises(ValueError, match="both set and cleared"):
        await engine_store.update_job(
            job.job_id, JobUpdate(error_code="x", clear=frozenset({"error_code"}))
        )
    assert await engine_store.get_job(job.job_id) is not None


# --- outbox -----------------------------------------------------------------------------


async def test_outbox_rows_are_written_with_the_transition(engine_store):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S, JobState.SUBMITTED)
    await engine_store.transition(
        job.job_id,
        {JobState.SUBMITTED},
        JobState.READY,
        None,
        [ready_message(job.export_name, "mqtt"), ready_message(job.export_name, "hook")],
    )
    due = await engine_store.due_outbox(START_TIME)
    assert [(m.job_id, m.target, m.event_type, m.export_name) for m in due] == [
        (job.job_id, "mqtt", "video.ready", job.export_name),
        (job.job_id, "hook", "video.ready", job.export_name),
    ]
    assert due[0].payload == b'{"type":"ready"}'
    assert (due[0].attempts, due[0].status, due[0].last_error) == (0, "pending", None)
    assert await engine_store.outbox_pending_for_job(job.job_id) == 2


async def test_replayed_terminal_transition_of_one_round_cannot_enqueue_twice(engine_store):
    # The replay: the job went round again under the same export name and ended the same way.
    _, [job] = await accept(engine_store, "k1")
    round_one = [failed_message(job.export_name)]
    await walk(engine_store, job.job_id, M, S)
    await engine_store.transition(job.job_id, {S}, JobState.FAILED, None, round_one)
    await walk(engine_store, job.job_id, R, M, S)
    await engine_store.transition(job.job_id, {S}, JobState.FAILED, None, round_one)
    assert await engine_store.outbox_backlog() == 1
    assert len(await engine_store.job_history(job.job_id)) == 8


async def test_retried_job_that_fails_again_announces_its_new_round(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M)
    await engine_store.transition(
        job.job_id, {M}, JobState.FAILED, None, [failed_message(job.export_name)]
    )
    store_clock.advance(60)
    retry = retry_update(await engine_store.get_job(job.job_id), now=store_clock())
    retried = await engine_store.transition(job.job_id, {JobState.FAILED}, M, retry)
    assert retried.export_name == f"{job.export_name}/r{int(store_clock() * 1000)}"

    with pytest.raises(ValueError, match="round"):
        await engine_store.transition(
            job.job_id, {M}, JobState.FAILED, None, [failed_message(job.export_name)]
        )
    assert (await engine_store.get_job(job.job_id)).state is M
    await engine_store.transition(
        job.job_id, {M}, JobState.FAILED, None, [failed_message(retried.export_name)]
    )

    due = await engine_store.due_outbox(store_clock())
    assert [(m.event_type, m.export_name) for m in due] == [
        ("video.failed", job.export_name),
        ("video.failed", retried.export_name),
    ]
    assert due[1].payload == f'{{"round":"{retried.export_name}"}}'.encode()
    assert await engine_store.outbox_pending_for_job(job.job_id) == 2


async def test_due_outbox_order_retry_dead_and_delivered(engine_store, store_clock):
    ids = []
    for n in range(3):
        _, [job] = await accept(engine_store, f"k{n}")
        await walk(engine_store, job.job_id, M)
        await engine_store.transition(
            job.job_id, {M}, JobState.FAILED, None, [failed_message(job.export_name)]
        )
        ids.append(job.job_id)
        store_clock.advance(1)
    assert await engine_store.due_outbox(START_TIME - 1) == []
    due = await engine_store.due_outbox(START_TIME + 10)
    assert [m.job_id for m in due] == ids
    assert [m.job_id for m in await engine_store.due_outbox(START_TIME + 10, limit=2)] == ids[:2]

    first, second, third = due
    await engine_store.outbox_retry(first.id, START_TIME + 60, "503 from target")
    await engine_store.outbox_dead(second.id, "410 Gone")
    await engine_store.outbox_delivered(third.id)

    assert await engine_store.due_outbox(START_TIME + 59) == []
    [retried] = await engine_store.due_outbox(START_TIME + 60)
    assert (retried.id, retried.attempts, retried.last_error) == (first.id, 1, "503 from target")
    assert retried.next_attempt_at == START_TIME + 60
    assert await engine_store.outbox_backlog() == 1
    assert await engine_store.outbox_pending_for_job(ids[1]) == 0
    assert await engine_store.outbox_pending_for_job(ids[0]) == 1
    with pytest.raises(LookupError):
        await engine_store.outbox_delivered(99_999)


async def test_the_sending_instance_keeps_its_announcements_across_scans_and_renewals(
    store_engine, store_clock
):
    # Built as the app builds it, with its instance id, on either engine.
    def instance() -> Store:
        return store_from_url(store_engine.url, clock=store_clock, instance="a")

    store = instance()
    await store.open()
    try:
        _, [job] = await accept(store, "k1")
        await walk(store, job.job_id, M)
        await store.transition(
            job.job_id, {M}, JobState.FAILED, None, [failed_message(job.export_name)]
        )
        now = store_clock()
        [sending] = await store.due_outbox(now)
        await store.renew_outbox_claims({sending.id}, now + 5)
        assert [m.id for m in await store.due_outbox(now + 5)] == [sending.id]
    finally:
        await store.close()
    restarted = instance()  # the same instance id takes its rows back without waiting
    await restarted.open()
    try:
        assert [m.id for m in await restarted.due_outbox(now + 6)] == [sending.id]
        await restarted.outbox_delivered(sending.id)
        await restarted.renew_outbox_claims({sending.id, 99_999}, now + 7)  # finished, unknown
        await restarted.renew_outbox_claims(set(), now + 7)
        assert await restarted.due_outbox(now + 1000) == []
        assert await restarted.outbox_pending_for_job(job.job_id) == 0
    finally:
        await restarted.close()


# --- queries ----------------------------------------------------------------------------


async def test_list_jobs_filters_and_pages_newest_first(engine_store, store_clock):
    ids = []
    for n in range(5):
        route = "a" if n % 2 == 0 else "b"
        _, [job] = await accept(engine_store, f"k{n}", (route,))
        ids.append(job.job_id)
        store_clock.advance(1)
    await walk(engine_store, ids[0], M)
    await walk(engine_store, ids[3], M)

    newest_first = list(reversed(ids))
    assert [j.job_id for j in await engine_store.list_jobs()] == newest_first
    page1 = await engine_store.list_jobs(limit=2)
    page2 = await engine_store.list_jobs(limit=2, after=page1[-1].job_id)
    page3 = await engine_store.list_jobs(limit=2, after=page2[-1].job_id)
    assert [j.job_id for j in page1 + page2 + page3] == newest_first
    assert [j.job_id for j in await engine_store.list_jobs(route="a")] == [ids[4], ids[2], ids[0]]
    assert [j.job_id for j in await engine_store.list_jobs(state=M)] == [ids[3], ids[0]]
    assert [j.job_id for j in await engine_store.list_jobs(state=M, route="b")] == [ids[3]]
    assert await engine_store.list_jobs(after="job_unknown") == []


async def test_job_ids_with_prefix_finds_exactly_the_ids_that_start_with_it(engine_store):
    event = sample_event("k-prefix")
    jobs = [
        replace(sample_job(event, route), job_id=job_id)
        for route, job_id in (("a", "job_ab12"), ("b", "job_ab13"), ("c", "job_ac00"))
    ]
    await engine_store.accept_event(event, jobs)
    assert await engine_store.job_ids_with_prefix("job_ab") == ["job_ab12", "job_ab13"]
    assert await engine_store.job_ids_with_prefix("job_ab1", limit=1) == ["job_ab12"]
    assert await engine_store.job_ids_with_prefix("job_ac00") == ["job_ac00"]
    assert await engine_store.job_ids_with_prefix("job_AB") == []  # ids are case-sensitive
    assert await engine_store.job_ids_with_prefix("job_b") == []
    assert await engine_store.job_ids_with_prefix("") == []


async def test_jobs_in_states_oldest_first(engine_store, store_clock):
    ids = []
    for n in range(4):
        _, [job] = await accept(engine_store, f"k{n}")
        ids.append(job.job_id)
        store_clock.advance(1)
    await walk(engine_store, ids[1], M)
    assert [j.job_id for j in await engine_store.jobs_in_states({R})] == [ids[0], ids[2], ids[3]]
    assert [j.job_id for j in await engine_store.jobs_in_states({R, M}, limit=2)] == ids[:2]
    assert await engine_store.jobs_in_states(set()) == []


async def test_count_jobs_by_state_includes_zeros(engine_store):
    for n in range(3):
        await accept(engine_store, f"k{n}")
    _, [job] = await accept(engine_store, "k9")
    await walk(engine_store, job.job_id, M)
    counts = await engine_store.count_jobs_by_state()
    assert set(counts) == set(JobState)
    assert counts[R] == 3
    assert counts[M] == 1
    assert sum(counts.values()) == 4


# --- housekeeping -----------------------------------------------------------------------


async def test_purge_dedupe_keeps_recent_and_unfinished(engine_store, store_clock):
    week = 7 * 86400
    old = START_TIME

    async def old_event(key, final_state, *, announce=False, received_at=old):
        event = sample_event(key, received_at=received_at)
        job = sample_job(event)
        await engine_store.accept_event(event, [job])
        if final_state is not R:
            on_the_way = WAY_TO[final_state]
            await walk(engine_store, job.job_id, *on_the_way)
            before = on_the_way[-1] if on_the_way else R
            outbox = [ready_message(job.export_name)] if announce else []
            await engine_store.transition(job.job_id, {before}, final_state, None, outbox)
        return job

    done = await old_event("done", JobState.FAILED)
    await old_event("pending-outbox", JobState.FAILED, announce=True)
    await old_event("running", R)
    await old_event("recent", JobState.IGNORED, received_at=old + 2 * week)
    delivered = await old_event("delivered", JobState.NOTIFIED, announce=True)
    due = await engine_store.due_outbox(old + 10 * week)
    [row] = [m for m in due if m.job_id == delivered.job_id]
    await engine_store.outbox_delivered(row.id)
    await engine_store.reject_event(sample_event("rejected", received_at=old), "bad body")

    purged = await engine_store.purge_dedupe(old + week)

    assert purged == 3  # done, delivered, rejected
    assert await engine_store.get_job(done.job_id) is None
    assert await engine_store.job_history(done.job_id) == []
    assert await engine_store.get_job(delivered.job_id) is None
    kept = {j.route + ":" + j.export_name for j in await engine_store.list_jobs()}
    assert len(kept) == 3
    again, _ = await accept(engine_store, "done")
    assert not again.duplicate  # the key is forgotten
    still, _ = await accept(engine_store, "running")
    assert still.duplicate
    assert await engine_store.purge_dedupe(old + week) == 0


# --- availability -----------------------------------------------------------------------


async def test_ping_and_closed_store(engine_store):
    await engine_store.ping()
    await engine_store.close()
    with pytest.raises(StoreUnavailableError):
        await engine_store.ping()
    with pytest.raises(StoreUnavailableError):
        await accept(engine_store, "k1")
    with pytest.raises(StoreUnavailableError):
        await engine_store.get_job("job_x")


# --- ownership: claims, leases, fencing -------------------------------------------------

IN_FLIGHT = {S, JobState.SUBMITTED, JobState.RECONCILE}


async def test_a_claim_names_its_owner_lease_and_a_new_fence(engine_store):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S)
    claimed = await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=30)
    assert (claimed.owner, claimed.lease_until) == ("w1", START_TIME + 30)
    assert claimed.fence == 1
    assert (await engine_store.get_job(job.job_id)).fence == 1


async def test_a_live_lease_keeps_other_workers_out_until_it_expires(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S)
    await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=30)
    assert await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w2", lease_s=30) is None
    assert await engine_store.claim_jobs(IN_FLIGHT, owner="w2", lease_s=30, limit=10) == []
    store_clock.advance(30)
    [taken] = await engine_store.claim_jobs(IN_FLIGHT, owner="w2", lease_s=30, limit=10)
    assert (taken.job_id, taken.owner, taken.fence) == (job.job_id, "w2", 2)


async def test_the_same_owner_takes_its_own_jobs_back_at_once(engine_store):
    # A restarted worker keeps its owner id: its jobs need not wait for the lease to run out.
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S)
    first = await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=30)
    [again] = await engine_store.claim_jobs(IN_FLIGHT, owner="w1", lease_s=30, limit=10)
    assert again.fence == first.fence + 1


async def test_a_stale_claimants_transition_and_update_are_refused(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S)
    stale = await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=5)
    store_clock.advance(6)
    fresh = await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w2", lease_s=5)
    with pytest.raises(FencedError):
        await engine_store.transition(
            job.job_id, {S}, JobState.SUBMITTED, JobUpdate(project_id="p"), fence=stale.fence
        )
    with pytest.raises(StaleTransitionError):  # a FencedError is a stale transition too
        await engine_store.update_job(job.job_id, JobUpdate(progress=5.0), fence=stale.fence)
    assert (await engine_store.get_job(job.job_id)).state is S
    moved = await engine_store.transition(
        job.job_id, {S}, JobState.SUBMITTED, JobUpdate(project_id="p"), fence=fresh.fence
    )
    assert moved.project_id == "p"
    assert [t.to_state for t in await engine_store.job_history(job.job_id)][-1] is (
        JobState.SUBMITTED
    )


async def test_claims_take_only_jobs_in_the_given_states_oldest_first(engine_store):
    jobs = []
    for key in ("k1", "k2", "k3"):
        _, [job] = await accept(engine_store, key)
        jobs.append(job)
    await walk(engine_store, jobs[0].job_id, M, S)
    await walk(engine_store, jobs[2].job_id, M, S)
    claimed = await engine_store.claim_jobs(IN_FLIGHT, owner="w1", lease_s=5, limit=1)
    assert [j.job_id for j in claimed] == [jobs[0].job_id]
    claimed = await engine_store.claim_jobs(IN_FLIGHT, owner="w2", lease_s=5, limit=10)
    assert [j.job_id for j in claimed] == [jobs[2].job_id]
    assert await engine_store.claim_job(jobs[1].job_id, IN_FLIGHT, owner="w1", lease_s=5) is None


async def test_renewing_keeps_the_lease_without_changing_the_fence(engine_store, store_clock):
    _, [job] = await accept(engine_store, "k1")
    await walk(engine_store, job.job_id, M, S)
    claimed = await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w1", lease_s=5)
    store_clock.advance(4)
    assert await engine_store.renew_leases("w1", 5) == 1
    store_clock.advance(4)
    assert await engine_store.claim_job(job.job_id, IN_FLIGHT, owner="w2", lease_s=5) is None
    renewed = await engine_store.get_job(job.job_id)
    assert (renewed.fence, renewed.lease_until) == (claimed.fence, START_TIME + 9)
    assert await engine_store.renew_leases("nobody", 5) == 0


async def test_render_estimates_are_kept_across_a_restart(engine_store, store_engine):
    assert await engine_store.render_estimates() == {}
    await engine_store.save_render_estimate("promo", 12.5)
    await engine_store.save_render_estimate("promo", 11.0)
    await engine_store.save_render_estimate("news", 60.0)
    await engine_store.close()
    reopened = store_engine.make()
    await reopened.open()
    try:
        assert await reopened.render_estimates() == {"promo": 11.0, "news": 60.0}
    finally:
        await reopened.close()


async def test_finished_jobs_are_not_renewed(engine_store):
    _, [done] = await accept(engine_store, "k1")
    _, [running] = await accept(engine_store, "k2")
    await walk(engine_store, done.job_id, M)
    await walk(engine_store, running.job_id, M)
    await engine_store.claim_job(done.job_id, {M}, owner="w1", lease_s=5)
    await engine_store.claim_job(running.job_id, {M}, owner="w1", lease_s=5)
    await engine_store.transition(done.job_id, {M}, JobState.FAILED)
    assert await engine_store.renew_leases("w1", 5) == 1


async def test_ready_jobs_delivered_are_those_with_no_pending_row(engine_store, store_clock):
    jobs = []
    for key in ("pending", "delivered", "dead", "not-ready"):
        _, [job] = await accept(engine_store, key)
        jobs.append(job)
        store_clock.advance(1)
    for job in jobs[:3]:
        await walk(engine_store, job.job_id, M, S, JobState.SUBMITTED)
        await engine_store.transition(
            job.job_id, {JobState.SUBMITTED}, JobState.READY, None, [ready_message(job.export_name)]
        )
    rows = {m.job_id: m for m in await engine_store.due_outbox(store_clock() + 1)}
    await engine_store.outbox_delivered(rows[jobs[1].job_id].id)
    await engine_store.outbox_dead(rows[jobs[2].job_id].id, "410 Gone")

    delivered = await engine_store.ready_jobs_delivered(limit=10)

    assert [j.job_id for j in delivered] == [jobs[1].job_id, jobs[2].job_id]
    assert [j.job_id for j in await engine_store.ready_jobs_delivered(limit=1)] == [jobs[1].job_id]
    await engine_store.outbox_delivered(rows[jobs[0].job_id].id)
    assert len(await engine_store.ready_jobs_delivered(limit=10)) == 3
