"""Spending caps: pure period and release decisions, the store's atomic spend, the real pipeline."""

import time
from datetime import UTC, datetime

import anyio
import orjson
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.jobs.budget import (
    BudgetLimits,
    Spent,
    caps_for,
    day_start,
    month_start,
    next_rollover,
    releasable,
    report,
)
from service.model import (
    ALLOWED_TRANSITIONS,
    REFUNDING_MOVES,
    Job,
    JobState,
    JobUpdate,
    SpendCap,
)
from service.store.base import FencedError, StaleTransitionError, Store
from tests.support.aistudios_fixtures import running_simulator
from tests.support.jobs_fixtures import jobs_harness, outbox_for
from tests.support.store_fixtures import sample_event, sample_job

S = JobState


def no_rows(_job, _cap):
    return []


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def held_job(job_id: str, route: str = "r"):
    event = sample_event(job_id)
    new = sample_job(event, route=route)
    return Job(
        job_id=job_id,
        event_row=1,
        source="shop",
        route=route,
        state=S.HELD,
        export_name=new.export_name,
        created_at=0.0,
        updated_at=0.0,
    )


# --- pure decisions ------------------------------------------------------------------------


def test_periods_are_utc_days_and_months():
    now = at("2026-12-31T23:59:59")
    assert day_start(now) == at("2026-12-31T00:00:00")
    assert month_start(now) == at("2026-12-01T00:00:00")
    assert next_rollover(now) == at("2027-01-01T00:00:00")
    assert next_rollover(at("2027-01-01T00:00:00")) == at("2027-01-02T00:00:00")


def test_caps_name_their_period_narrowest_first():
    limits = BudgetLimits(exports_per_day=5, exports_per_month=100, route_per_day={"shop": 2})
    now = at("2026-12-01T10:00:00")
    caps = caps_for(limits, "shop", now)
    assert [c.period for c in caps] == [
        "route:shop:day:2026-12-01",
        "day:2026-12-01",
        "month:2026-12",
    ]
    assert caps[0].route == "shop"
    assert caps[0].since == caps[1].since == at("2026-12-01T00:00:00")
    assert caps_for(limits, "cms", now)[0].period == "day:2026-12-01"
    assert caps_for(BudgetLimits(), "shop", now) == ()


def test_release_admits_oldest_first_only_as_many_as_the_room_left():
    held = [held_job(f"j{i}") for i in range(5)]
    limits = BudgetLimits(exports_per_day=5)
    assert releasable(held, limits, Spent(day=5, month=5)) == []
    assert releasable(held, limits, Spent(day=3, month=3)) == ["j0", "j1"]
    assert releasable(held, BudgetLimits(exports_per_day=9), Spent(day=5)) == [
        "j0",
        "j1",
        "j2",
        "j3",
    ]
    assert releasable(held, BudgetLimits(), Spent(day=500)) == [j.job_id for j in held]


def test_a_full_route_cap_does_not_block_other_routes_and_the_month_cap_counts_too():
    held = [held_job("a1", "shop"), held_job("b1", "cms"), held_job("a2", "shop")]
    limits = BudgetLimits(exports_per_month=10, route_per_day={"shop": 1})
    spent = Spent(day=1, month=8, route_day={"shop": 1})
    assert releasable(held, limits, spent) == ["b1"]
    assert releasable(held, limits, Spent(month=8)) == ["a1", "b1"]


def test_report_shows_spent_and_remaining_per_period_and_route():
    limits = BudgetLimits(exports_per_day=5, route_per_day={"shop": 2})
    lines = report(limits, Spent(day=3, month=7, route_day={"shop": 2}), ["shop", "cms"], 0.0)
    figures = {(line.scope, line.limit, line.spent, line.remaining) for line in lines}
    assert figures == {
        ("day", 5, 3, 2),
        ("month", None, 7, None),
        ("route:shop", 2, 2, 0),
        ("route:cms", None, 0, None),
    }


def test_held_is_entered_only_from_mapped_and_never_posts_directly():
    sources = {state for state, targets in ALLOWED_TRANSITIONS.items() if S.HELD in targets}
    assert sources == {S.MAPPED}
    # Released back to `mapped`, or replaced by a newer job of its coalescing key.
    assert ALLOWED_TRANSITIONS[S.HELD] == {S.MAPPED, S.SUPERSEDED}
    assert all(S.HELD not in move for move in REFUNDING_MOVES)


# --- the store: one transaction decides and records -----------------------------------------


async def mapped_jobs(store: Store, count: int, route: str = "new-product") -> list[str]:
    ids = []
    for i in range(count):
        event = sample_event(f"spend-{route}-{i}")
        new = sample_job(event, route=route)
        await store.accept_event(event, [new])
        await store.transition(new.job_id, {S.RECEIVED}, S.MAPPED, JobUpdate(export_body=b"{}"))
        ids.append(new.job_id)
    return ids


@pytest.mark.anyio
async def test_64_concurrent_paid_calls_never_overshoot_the_cap(engine_store: Store):
    store = engine_store
    ids = await mapped_jobs(store, 64)
    cap = SpendCap("day:test", 0.0, 5)
    outcomes: list[JobState] = []

    async def one(job_id: str) -> None:
        job = await store.spend_or_hold(
            job_id,
            [cap],
            JobUpdate(attempts=1),
            lambda j, _c: outbox_for(j, "budget.exhausted"),
        )
        outcomes.append(job.state)

    async with anyio.create_task_group() as tg:
        for job_id in ids:
            tg.start_soon(one, job_id)
    assert outcomes.count(S.SUBMITTING) == 5
    assert outcomes.count(S.HELD) == 59
    assert await store.spend_counts(0.0) == {"new-product": 5}
    announced = [
        r for r in await store.due_outbox(1e12, 1000) if r.event_type == "budget.exhausted"
    ]
    assert len(announced) == 1
    payload = orjson.loads(announced[0].payload)
    assert payload["type"] == "budget.exhausted"


@pytest.mark.anyio
async def test_a_call_that_certainly_created_nothing_gives_its_unit_back(engine_store: Store):
    store = engine_store
    first, second = await mapped_jobs(store, 2)
    cap = SpendCap("day:test", 0.0, 1)
    job = await store.spend_or_hold(first, [cap], JobUpdate(attempts=1), no_rows)
    assert job.state is S.SUBMITTING
    assert (await store.spend_or_hold(second, [cap], JobUpdate(), no_rows)).state is S.HELD
    # A 429: nothing was created, back to mapped, and the unit is free again.
    await store.transition(first, {S.SUBMITTING}, S.MAPPED, JobUpdate(note="429"))
    assert await store.spend_counts(0.0) == {}
    await store.transition(second, {S.HELD}, S.MAPPED)
    assert (await store.spend_or_hold(second, [cap], JobUpdate(), no_rows)).state is S.SUBMITTING
    # An uncertain outcome keeps the unit counted.
    await store.transition(second, {S.SUBMITTING}, S.RECONCILE)
    assert await store.spend_counts(0.0) == {"new-product": 1}


@pytest.mark.anyio
async def test_a_route_cap_counts_only_that_route(engine_store: Store):
    store = engine_store
    shop = await mapped_jobs(store, 2, route="shop")
    cms = await mapped_jobs(store, 1, route="cms")
    cap = SpendCap("route:shop:day:x", 0.0, 1, route="shop")
    states = [
        (await store.spend_or_hold(job_id, [cap], JobUpdate(), no_rows)).state for job_id in shop
    ]
    assert states == [S.SUBMITTING, S.HELD]
    other = await store.spend_or_hold(cms[0], (), JobUpdate(), no_rows)
    assert other.state is S.SUBMITTING
    assert await store.spend_counts(0.0) == {"shop": 1, "cms": 1}


@pytest.mark.anyio
async def test_the_paid_call_is_fenced_and_taken_from_mapped_only(engine_store: Store):
    store = engine_store
    [job_id] = await mapped_jobs(store, 1)
    claimed = await store.claim_job(job_id, {S.MAPPED}, owner="w1", lease_s=30.0)
    assert claimed is not None
    with pytest.raises(FencedError):
        await store.spend_or_hold(job_id, (), JobUpdate(), no_rows, fence=claimed.fence - 1)
    assert await store.spend_counts(0.0) == {}
    job = await store.spend_or_hold(job_id, (), JobUpdate(), no_rows, fence=claimed.fence)
    assert job.state is S.SUBMITTING
    with pytest.raises(StaleTransitionError):
        await store.spend_or_hold(job_id, (), JobUpdate(), no_rows, fence=claimed.fence)
    assert await store.spend_counts(0.0) == {"new-product": 1}


@pytest.mark.anyio
async def test_spend_outlives_the_dedupe_purge_of_its_job(engine_store: Store, store_clock):
    store = engine_store
    [job_id] = await mapped_jobs(store, 1)
    await store.spend_or_hold(job_id, (), JobUpdate(), no_rows)
    for before, after in ((S.SUBMITTING, S.SUBMITTED), (S.SUBMITTED, S.READY)):
        await store.transition(job_id, {before}, after)
    await store.transition(job_id, {S.READY}, S.NOTIFIED)
    store_clock.advance(100.0)
    assert await store.purge_dedupe(store_clock.now - 50.0) == 1
    assert await store.get_job(job_id) is None
    assert await store.spend_counts(0.0) == {"new-product": 1}


# --- the real pipeline, simulator and store ------------------------------------------------


class ShiftedClock:
    """Wall time plus an offset a test moves forward (a day passes in an instant)."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


async def in_states(store, job_ids, states):
    jobs = [await store.get_job(job_id) for job_id in job_ids]
    return [job for job in jobs if job.state in states]


async def budget_rows(store):
    rows = await store.due_outbox(time.time() + 10 * 86400, limit=1000)
    return [row for row in rows if row.event_type == "budget.exhausted"]


@pytest.mark.anyio
async def test_cap_of_5_bills_5_holds_3_announces_once_and_releases_after_rollover_and_restart(
    tmp_path,
):
    clock = ShiftedClock()
    budget = BudgetLimits(exports_per_day=5)
    settings = {"budget": budget, "clock": clock, "budget_rescan_s": 0.05}
    async with running_simulator(SimulatorKnobs(render_seconds=0.2)) as simulator:
        async with jobs_harness(
            tmp_path, shared_simulator=simulator, max_concurrent_exports=64, **settings
        ) as h:
            jobs = [await h.add_job(f"cap-{i}") for i in range(8)]
            ids = [job.job_id for job in jobs]

            async def settled():
                ready = await in_states(h.store, ids, {S.READY})
                held = await in_states(h.store, ids, {S.HELD})
                return (ready, held) if len(ready) == 5 and len(held) == 3 else None

            _, held = await h.store.wait_until(settled)
            assert simulator.export_count == 5
            assert len(await budget_rows(h.store)) == 1
            assert all(job.error_code == "budget_exhausted" for job in held)
            assert await h.store.spend_counts(0.0) == {"new-product": 5}
            held_ids = {job.job_id for job in held}
        # A restart in the same day: still 5 billed, the 3 stay held, nothing announced again.
        async with jobs_harness(tmp_path, shared_simulator=simulator, **settings) as h:
            # Nothing should happen here, so there is no event to await: give the budget loop
            # (rescanning every 0.05 s) a few turns to prove it releases nothing today.
            await anyio.sleep(0.2)
            assert {j.job_id for j in await in_states(h.store, ids, {S.HELD})} == held_ids
            assert simulator.export_count == 5
            # The next UTC day: the three are released, in order, and billed once each.
            clock.offset_s = next_rollover(clock()) - time.time() + 1.0

            async def all_ready():
                return len(await in_states(h.store, ids, {S.READY})) == 8

            await h.store.wait_until(all_ready)
            assert simulator.export_count == 8
            assert set(simulator.billed_by_name().values()) == {1}
            assert len(await budget_rows(h.store)) == 1
            for job_id in held_ids:
                history = [t.to_state for t in await h.store.job_history(job_id)]
                assert history[history.index(S.HELD) :][:3] == [S.HELD, S.MAPPED, S.SUBMITTING]


@pytest.mark.anyio
async def test_released_and_new_jobs_racing_for_a_raised_cap_with_64_slots_never_overshoot(
    tmp_path,
):
    settings = {"budget": BudgetLimits(exports_per_day=5), "budget_rescan_s": 0.05}
    knobs = SimulatorKnobs(render_seconds=0.1)
    slots = {"max_concurrent_exports": 64, "max_requests_per_second": 200.0}
    async with jobs_harness(tmp_path, knobs=knobs, **slots, **settings) as h:
        ids = [(await h.add_job(f"race-{i}")).job_id for i in range(30)]

        def settled(ready: int, held: int):
            async def check():
                counts = [
                    len(await in_states(h.store, ids, {state})) for state in (S.READY, S.HELD)
                ]
                return counts == [ready, held]

            return check

        await h.store.wait_until(settled(5, 25))
        # Room for 5 more and, at the same moment, 30 new jobs: the released held jobs and the
        # new ones reach the paid call together, through 64 slots.
        ids += [(await h.add_job(f"race-new-{i}", notify=False)).job_id for i in range(30)]
        h.pipeline.set_budget(BudgetLimits(exports_per_day=10))
        h.pipeline.notify_new_jobs()
        await h.store.wait_until(settled(10, 50))
        assert h.simulator.export_count == 10
        assert set(h.simulator.billed_by_name().values()) == {1}
        assert await h.store.spend_counts(0.0) == {"new-product": 10}
        assert len(await budget_rows(h.store)) == 1
        released = 0
        for job_id in ids[:30]:
            moves = [(t.from_state, t.to_state) for t in await h.store.job_history(job_id)]
            released += (S.HELD, S.MAPPED) in moves
        assert released >= 5


@pytest.mark.anyio
async def test_a_drafted_job_held_by_a_cap_keeps_its_draft_for_when_it_is_released(
    engine_store: Store,
):
    store = engine_store
    first, second = await mapped_jobs(store, 2)
    cap = SpendCap("day:test", 0.0, 1)
    await store.spend_or_hold(first, [cap], JobUpdate(attempts=1), no_rows)
    held = await store.spend_or_hold(second, [cap], JobUpdate(project_id="draft-2"), no_rows)
    assert (held.state, held.project_id) == (S.HELD, "draft-2")
