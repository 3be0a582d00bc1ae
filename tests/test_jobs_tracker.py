"""The tracker against the simulator on a virtual clock: long renders without waiting for them."""

import random

import anyio
import orjson
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.jobs.context import JobLoopContext
from service.jobs.ownership import OwnedJobs
from service.jobs.ratelimit import RenderSlots, RequestGate
from service.jobs.tracker import PollTiming, Tracker
from service.model import JobState, JobUpdate
from service.store.base import FencedError
from service.store.sqlite import SQLiteStore
from tests.support.aistudios_fixtures import client_for, running_simulator, v3_body
from tests.support.jobs_fixtures import ObservedStore, outbox_for
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio

S = JobState
TIMING = PollTiming(
    floor_s=2.0, ceiling_s=60.0, deadline_s=1800.0, stall_s=600.0, first_guess_s=5.0
)


class VirtualTime:
    """Shared by simulator, store and tracker; sleeping jumps the clock instead of waiting."""

    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()


def tracker_on(store, client, slots, clock, **options):
    """A tracker sharing the test's store, simulator client, slots and virtual clock."""
    ctx = JobLoopContext(
        store=store,
        api=client,
        slots=slots,
        gate=RequestGate(1000.0, clock=clock, sleep=clock.sleep),
        outbox_for=outbox_for,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(3),  # noqa: S311 - jitter, not cryptography
    )
    return Tracker(ctx, timing=TIMING, **options)


async def submitted_job(store, client, clock, key):
    event = sample_event(key)
    new_job = sample_job(event)
    await store.accept_event(event, [new_job])
    body = JobUpdate(export_body=orjson.dumps(v3_body()), api="v3")
    await store.transition(new_job.job_id, {S.RECEIVED}, S.MAPPED, body)
    await store.transition(new_job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1))
    project_id = await client.export_v3(v3_body(), name=new_job.export_name)
    update = JobUpdate(project_id=project_id, submitted_at=clock())
    return await store.transition(new_job.job_id, {S.SUBMITTING}, S.SUBMITTED, update)


@pytest.mark.parametrize("render_s", [10.0, 60.0, 300.0])
async def test_a_render_costs_a_handful_of_polls_whatever_its_length(tmp_path, render_s):
    clock = VirtualTime()
    inner = SQLiteStore(tmp_path / "t.db", clock=clock)
    await inner.open()
    store = ObservedStore(inner)
    knobs = SimulatorKnobs(render_seconds=render_s)
    try:
        async with (
            running_simulator(knobs, clock=clock) as simulator,
            client_for(simulator) as client,
        ):
            job = await submitted_job(store, client, clock, f"long-{render_s}")
            slots = RenderSlots(1)
            owned = OwnedJobs(store, slots, owner="test")
            await owned.claim(job.job_id, {S.SUBMITTED})
            assert slots.in_flight == 1
            tracker = tracker_on(owned, client, slots, clock)
            tracker.track(job)
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.run)
                ready = await store.wait_for(job.job_id, {S.READY, S.FAILED})
                tg.cancel_scope.cancel()
            polls = [p for _, _, p in simulator.requests if "/progress/" in p]
    finally:
        await inner.close()
    assert ready.state is S.READY
    assert ready.polls == len(polls) <= 6
    lag = ready.ready_at - (ready.submitted_at + render_s)
    assert 0 <= lag < max(0.1 * render_s, 2.5)
    assert slots.in_flight == 0
    assert tracker.tracked == 0


class StoppedTime(VirtualTime):
    """A virtual clock that only the test moves: a sleeper waits until `advance_to` passes it."""

    def __init__(self):
        super().__init__()
        self._moved = anyio.Event()

    async def sleep(self, seconds):
        until = self.now + max(seconds, 0.0)
        while self.now < until:
            moved = self._moved
            await moved.wait()

    def advance_to(self, moment):
        self.now = moment
        self._moved.set()
        self._moved = anyio.Event()


async def test_wake_polls_at_once_instead_of_at_the_scheduled_time(tmp_path):
    clock = StoppedTime()
    inner = SQLiteStore(tmp_path / "t.db", clock=clock)
    await inner.open()
    store = ObservedStore(inner)
    try:
        async with (
            running_simulator(SimulatorKnobs(render_seconds=2.0), clock=clock) as simulator,
            client_for(simulator) as client,
        ):
            job = await submitted_job(store, client, clock, "woken")
            tracker = tracker_on(store, client, RenderSlots(1), clock)
            tracker.track(job)  # first poll scheduled first_guess_s (5 s) after submit
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.run)
                await anyio.wait_all_tasks_blocked()  # the loop sleeps until the first poll
                await tracker.wake("job_not_tracked")  # harmless
                clock.advance_to(job.submitted_at + 2.0)  # render done, poll still 3 s away
                await tracker.wake(job.job_id)
                # Nothing else moves the clock again: only the wake can poll before the 5 s mark.
                ready = await store.wait_for(job.job_id, {S.READY, S.FAILED}, timeout_s=5.0)
                tg.cancel_scope.cancel()
    finally:
        await inner.close()
    assert ready.state is S.READY
    assert ready.polls == 1
    assert ready.ready_at == pytest.approx(job.submitted_at + 2.0)


@pytest.mark.parametrize("called_back", [True, False])
async def test_the_ready_hook_gets_the_committed_job_and_its_first_callback_time(
    tmp_path, called_back
):
    clock = VirtualTime()
    inner = SQLiteStore(tmp_path / "t.db", clock=clock)
    await inner.open()
    store = ObservedStore(inner)
    heard = []

    def on_ready(job, first_callback_at):
        heard.append((job, first_callback_at, clock.now))

    try:
        async with (
            running_simulator(SimulatorKnobs(render_seconds=30.0), clock=clock) as simulator,
            client_for(simulator) as client,
        ):
            job = await submitted_job(store, client, clock, f"hooked-{called_back}")
            tracker = tracker_on(store, client, RenderSlots(1), clock, on_ready=on_ready)
            tracker.track(job)
            clock.now += 40.0  # the render finished before its first poll
            if called_back:
                await tracker.wake(job.job_id)
                clock.now += 1.0
                await tracker.wake(job.job_id)  # a repeated callback is not the first
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.run)
                ready = await store.wait_for(job.job_id, {S.READY, S.FAILED})
                tg.cancel_scope.cancel()
    finally:
        await inner.close()
    [(committed, first_callback_at, _)] = heard
    assert committed == ready
    assert committed.state is S.READY
    expected = job.submitted_at + 40.0 if called_back else None
    assert first_callback_at == expected


async def test_a_take_over_while_a_refused_ready_commit_settles_keeps_the_render_followed(
    tmp_path,
):
    # This worker stalled past its lease; another worker claimed the job and stalled too. The
    # ready commit under the old fence is refused, and while the tracker looks the job up
    # again, this worker's lease loop takes the job back and follows it afresh. The refusal
    # must not stop that new render, or the job stays `submitted` under a lease this worker
    # keeps renewing, so nobody else takes it over either.
    clock = VirtualTime()
    inner = SQLiteStore(tmp_path / "t.db", clock=clock)
    await inner.open()
    store = ObservedStore(inner)
    slots = RenderSlots(1)
    owned = OwnedJobs(store, slots, owner="w", lease_s=30.0)
    try:
        async with (
            running_simulator(SimulatorKnobs(render_seconds=10.0), clock=clock) as simulator,
            client_for(simulator) as client,
        ):
            job = await submitted_job(store, client, clock, "claimed-back")
            (claimed,) = await owned.claim_free({S.SUBMITTED}, 1, take_own=True)
            tracker = tracker_on(owned, client, slots, clock)
            tracker.track(claimed)
            clock.now += 31.0  # this worker's lease ran out: the other one claims the job
            assert await store.claim_job(job.job_id, {S.SUBMITTED}, owner="x", lease_s=30.0)
            refused = anyio.Event()
            taken_back: list[int] = []
            real_transition, real_get_job = owned.transition, owned.get_job

            async def transition(*args, **kwargs):
                try:
                    return await real_transition(*args, **kwargs)
                except FencedError:
                    refused.set()
                    raise

            async def get_job(job_id):
                found = await real_get_job(job_id)
                if refused.is_set() and not taken_back:
                    clock.now += 31.0  # the other worker's lease ran out as well
                    (again,) = await owned.claim_free({S.SUBMITTED}, 1, take_own=False)
                    taken_back.append(again.fence)
                    tracker.track(again)  # the last thing before the lookup returns
                return found

            owned.transition, owned.get_job = transition, get_job
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.run)
                ready = await store.wait_for(job.job_id, {S.READY, S.FAILED}, timeout_s=5.0)
                tg.cancel_scope.cancel()
    finally:
        await inner.close()
    assert taken_back == [3]  # the refused commit happened, and the take-over before its end
    assert ready.state is S.READY
