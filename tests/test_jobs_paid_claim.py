"""A paid request leaves only under a claim this worker provably still holds.

Fencing refuses a stale worker's commits; these tests cover the request itself: a worker
paused between its `submitting` commit and the export POST must not send it once another
worker has taken the job over (that worker settles the export by reading the project).
"""

import pytest
from structlog.testing import capture_logs

from service.jobs.ownership import PAY_WITHIN_LEASE, OwnedJobs, claim_is_fresh
from service.jobs.ratelimit import RenderSlots
from service.model import JobState
from service.store.sqlite import SQLiteStore
from tests.support.fakes import FakeClock
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

LEASE_S = 10.0


def test_a_claim_is_fresh_for_half_a_lease_from_the_moment_it_was_asked_for():
    assert claim_is_fresh(now=100.0, claimed_at=100.0, lease_s=LEASE_S)
    assert claim_is_fresh(now=104.9, claimed_at=100.0, lease_s=LEASE_S)
    assert not claim_is_fresh(now=100.0 + LEASE_S * PAY_WITHIN_LEASE, claimed_at=100.0, lease_s=10)
    assert not claim_is_fresh(now=100.0, claimed_at=None, lease_s=LEASE_S)


async def submitting_job(tmp_path):
    """A store with one job committed `submitting` under worker `w1`'s fresh claim (its
    render slot taken)."""
    store_clock = FakeClock()
    store = SQLiteStore(tmp_path / "studiohook.db", clock=store_clock)
    await store.open()
    event = sample_event("paid")
    [new] = [sample_job(event)]
    await store.accept_event(event, [new])
    await store.transition(new.job_id, {JobState.RECEIVED}, JobState.MAPPED)
    monotonic = FakeClock(1_000.0)  # this worker's own clock: a jump forward is a pause
    slots = RenderSlots(4)
    owned = OwnedJobs(store, slots, owner="w1", lease_s=LEASE_S, monotonic=monotonic)
    job = await owned.claim(new.job_id, {JobState.MAPPED})
    assert job is not None
    job = await owned.transition(job.job_id, {JobState.MAPPED}, JobState.SUBMITTING)
    assert slots.in_flight == 1
    return store, store_clock, monotonic, owned, job, slots


async def test_a_young_claim_pays_at_once_without_asking_the_store(tmp_path):
    store, _, monotonic, owned, job, _ = await submitting_job(tmp_path)
    try:
        monotonic.advance(1.0)
        assert await owned.may_pay(job)
        assert (await store.get_job(job.job_id)).fence == job.fence
    finally:
        await store.close()


async def test_after_a_pause_nobody_used_the_claim_is_renewed_then_paid(tmp_path):
    store, store_clock, monotonic, owned, job, _ = await submitting_job(tmp_path)
    try:
        monotonic.advance(LEASE_S)
        store_clock.advance(LEASE_S)
        assert await owned.may_pay(job)
        renewed = await store.get_job(job.job_id)
        assert (renewed.owner, renewed.fence) == ("w1", job.fence + 1)
        assert renewed.lease_until == store_clock.now + LEASE_S
    finally:
        await store.close()


async def test_after_a_pause_past_the_lease_another_workers_job_is_not_paid_for(tmp_path):
    store, store_clock, monotonic, owned, job, slots = await submitting_job(tmp_path)
    try:
        # w1 is frozen right after its commit; its lease runs out and w2 takes the job over.
        store_clock.advance(LEASE_S + 1)
        survivor = OwnedJobs(store, RenderSlots(4), owner="w2", lease_s=LEASE_S)
        [taken] = await survivor.claim_free({JobState.SUBMITTING}, 10, take_own=False)
        # w1 wakes up: its request must not leave, and w2's claim stays untouched.
        monotonic.advance(LEASE_S + 1)
        with capture_logs() as logs:
            assert not await owned.may_pay(job)
        assert [entry["event"] for entry in logs] == ["job.export_withheld", "job.claim_lost"]
        assert slots.in_flight == 0
        after = await store.get_job(job.job_id)
        assert (after.owner, after.fence) == ("w2", taken.fence)
    finally:
        await store.close()


async def test_a_job_that_reached_ready_leaves_no_claim_behind(tmp_path):
    store, _, _, owned, job, slots = await submitting_job(tmp_path)
    try:
        await owned.transition(job.job_id, {JobState.SUBMITTING}, JobState.SUBMITTED)
        assert owned.fence_of(job.job_id) == job.fence
        await owned.transition(job.job_id, {JobState.SUBMITTED}, JobState.READY)
        assert owned.fence_of(job.job_id) is None
        assert slots.in_flight == 0
        assert not await owned.may_pay(job)  # nothing to pay for: the claim is not renewed
    finally:
        await store.close()


class _TakeBackDuring:
    """The store, except that one worker's take-back scan lands while its first transition is
    under way: after the transition has read its fence, before the store refuses it."""

    def __init__(self, inner, take_back):
        self._inner = inner
        self._take_back = take_back

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def transition(self, *args, **kwargs):
        take_back, self._take_back = self._take_back, None
        if take_back is not None:
            await take_back()
        return await self._inner.transition(*args, **kwargs)


async def test_a_write_refused_after_the_worker_took_its_job_back_keeps_the_render_slot(tmp_path):
    store, store_clock, _, _, job, _ = await submitting_job(tmp_path)
    try:
        # w2 takes the job over from a stalled w1 (w1's fence is now stale) ...
        store_clock.advance(LEASE_S + 1)
        other = OwnedJobs(store, RenderSlots(4), owner="w2", lease_s=LEASE_S)
        [taken] = await other.claim_free({JobState.SUBMITTING}, 10, take_own=False)
        slots = RenderSlots(4)
        owned = OwnedJobs(None, slots, owner="w1", lease_s=LEASE_S)

        async def take_back():
            # ... and w2 stalls in turn: w1's scan takes the job back under a newer fence.
            store_clock.advance(LEASE_S + 1)
            [back] = await owned.claim_free({JobState.SUBMITTING}, 10, take_own=False)
            assert back.fence == taken.fence + 1

        owned._store = _TakeBackDuring(store, take_back)
        owned._own(job, asked_at=0.0)  # w1's original claim, under the old fence
        with pytest.raises(Exception, match="fence"), capture_logs() as logs:
            await owned.transition(job.job_id, {JobState.SUBMITTING}, JobState.SUBMITTED)
        events = [entry["event"] for entry in logs]
        assert "job.claim_lost" not in events
        assert "job.claim_renewed_meanwhile" in events
        assert slots.holds(job.job_id)
        assert slots.in_flight == 1
        # The newer claim is the one in force: a move under it goes through.
        moved = await owned.transition(job.job_id, {JobState.SUBMITTING}, JobState.SUBMITTED)
        assert (moved.state, moved.owner) == (JobState.SUBMITTED, "w1")
    finally:
        await store.close()
