import anyio
import pytest

from service.jobs.ports import NothingCreatedError
from service.jobs.ratelimit import AdaptiveRate, RenderSlots, RequestGate, TokenBucket
from service.model import JobState


def test_bucket_spaces_requests_at_the_rate_after_the_burst():
    bucket = TokenBucket(rate=4.0, burst=2)
    waits = [bucket.reserve(10.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75])


def test_bucket_refills_while_idle_but_never_beyond_the_burst():
    bucket = TokenBucket(rate=1.0, burst=3)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(100.0) == 0.0
    assert [bucket.reserve(100.0) for _ in range(3)] == pytest.approx([0.0, 0.0, 1.0])


def test_pause_holds_every_slot_and_ends_without_a_burst():
    bucket = TokenBucket(rate=10.0, burst=5)
    bucket.pause_until(20.0)
    waits = [bucket.reserve(15.0) for _ in range(3)]
    assert waits == pytest.approx([5.0, 5.1, 5.2])


def test_an_earlier_pause_never_shortens_a_later_one():
    bucket = TokenBucket(rate=10.0)
    bucket.pause_until(30.0)
    bucket.pause_until(12.0)
    assert bucket.paused_until == 30.0
    assert bucket.reserve(10.0) == pytest.approx(20.0)


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0)


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.sent = []

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.now += seconds
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_gate_never_releases_a_request_inside_a_pause():
    time = FakeTime()
    gate = RequestGate(rate=2.0, clock=time, burst=3, sleep=time.sleep)

    async def request(name):
        await gate(name)
        time.sent.append((time.now, name))

    await request("a")
    # A 429 arrives: no request before now + 3 s, then spaced at the rate.
    gate.pause_for(3.0)
    for name in "bcd":
        await request(name)
    assert time.sent[0] == (1000.0, "a")
    later = [at for at, _ in time.sent[1:]]
    assert min(later) >= 1003.0
    assert sorted(later) == pytest.approx([1003.0, 1003.5, 1004.0])


class HeldTime(FakeTime):
    """Sleeping blocks until the test lets go, so a pause can start mid-wait."""

    def __init__(self):
        super().__init__()
        self.let_go = anyio.Event()

    async def sleep(self, seconds):
        await self.let_go.wait()
        self.now += seconds


@pytest.mark.anyio
async def test_gate_rechecks_a_pause_that_began_while_waiting():
    time = HeldTime()
    gate = RequestGate(rate=1.0, clock=time, sleep=time.sleep)
    await gate("first")

    async def second():
        await gate("second")  # its slot (+1 s) is reserved before the pause below
        time.sent.append(time.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()  # "second" sleeps towards its slot
        gate.pause_until(1010.0)  # a 429 pauses everything until +10 s
        time.let_go.set()
    assert time.sent == [1010.0]


@pytest.mark.anyio
async def test_render_slots_block_at_capacity_and_free_when_the_committed_state_leaves():
    slots = RenderSlots(2)
    await slots.reserve("a")
    await slots.reserve("b")
    await slots.reserve("a")  # already held: no second slot
    slots.settle("a", JobState.SUBMITTING)  # a's export committed: a counts once
    assert slots.in_flight == 2
    got = anyio.Event()

    async def third():
        await slots.reserve("c")
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        slots.unreserve("a")  # a's submit ended, but a renders: still no slot
        await anyio.wait_all_tasks_blocked()
        assert not got.is_set()
        slots.settle("a", JobState.READY)
        slots.settle("a", JobState.NOTIFIED)  # idempotent
        await got.wait()
    assert slots.in_flight == 2
    slots.unreserve("b")  # b's submit ended without an export (a retry, say)
    assert slots.in_flight == 1


def test_reconcile_holds_no_slot_until_the_export_is_adopted():
    slots = RenderSlots(1)
    slots.settle("x", JobState.SUBMITTED)
    slots.settle("y", JobState.SUBMITTING)  # found at start: counted beyond capacity
    assert slots.in_flight == 2
    slots.settle("y", JobState.RECONCILE)
    assert slots.in_flight == 1
    slots.settle("y", JobState.SUBMITTED)  # the API showed the export: adopted
    assert slots.in_flight == 2
    slots.settle("x", None)  # another worker took x over
    assert slots.in_flight == 1


@pytest.mark.anyio
async def test_a_turn_taken_before_the_commit_lets_the_request_leave_unqueued():
    time = FakeTime()
    gate = RequestGate(rate=1.0, clock=time, sleep=time.sleep)
    await gate("poll")  # the slot at 1000 is taken
    async with gate.turn("v3.project_export"):
        taken_at = time.now  # waited here, before the commit
        await gate("v3.project_export")  # the POST itself: no second wait
        assert time.now == taken_at == 1001.0
        await gate("v3.progress")  # any other request still queues
        assert time.now == 1002.0


@pytest.mark.anyio
async def test_a_pause_that_began_after_the_turn_still_holds_the_request():
    time = FakeTime()
    gate = RequestGate(rate=10.0, clock=time, sleep=time.sleep)
    async with gate.turn("v3.project_export") as turn:
        gate.pause_for(2.0)  # a 429 seen by another request during the commit
        await gate("v3.project_export")
        assert time.now >= 1002.0
        # The render it starts is dated after the pause, not when the turn was taken.
        assert turn.held_s == pytest.approx(time.now - 1000.0)


@pytest.mark.anyio
async def test_a_turn_used_at_once_says_its_request_was_not_held():
    time = FakeTime()
    gate = RequestGate(rate=10.0, clock=time, sleep=time.sleep)
    async with gate.turn("v3.project_export") as turn:
        await gate("v3.project_export")
    assert turn.held_s == 0.0


def test_the_pace_halves_on_a_429_and_climbs_back_after_quiet_periods():
    pace = AdaptiveRate(100.0, quiet_s=5.0, steps_to_ceiling=10)
    assert pace.at(0.0) == 100.0
    assert pace.throttled(10.0) == 50.0
    assert pace.throttled(10.2) == 50.0  # the same overload: one cut per second at most
    assert pace.throttled(11.5) == 25.0
    assert pace.at(16.0) == 25.0  # not yet a whole quiet period since the last 429
    assert pace.at(16.5) == 35.0
    assert pace.at(36.5) == 75.0
    assert pace.at(1000.0) == 100.0  # never above the ceiling


def test_the_pace_never_falls_below_its_floor():
    pace = AdaptiveRate(4.0, floor=0.5)
    for second in range(20):
        pace.throttled(float(second))
    assert pace.rate == 0.5


class ThrottledError(NothingCreatedError):
    def __init__(self, retry_after_s=None, status=429):
        super().__init__("throttled")
        self.retry_after_s = retry_after_s
        self.status = status


@pytest.mark.anyio
async def test_a_429_slows_the_gate_and_its_retry_after_holds_every_request():
    time = FakeTime()
    gate = RequestGate(rate=10.0, clock=time, sleep=time.sleep)
    await gate("a")
    await gate("b")
    assert time.now == pytest.approx(1000.1)
    gate.throttled(ThrottledError(retry_after_s=2.0))
    assert gate.rate == 5.0
    await gate("c")
    await gate("d")
    assert time.now == pytest.approx(1002.3)  # c when the pause ends (1002.1), d 0.2 s later
    gate.throttled(ThrottledError(status=503))  # not a 429: the pace stays
    assert gate.rate == 5.0


@pytest.mark.anyio
async def test_lone_requests_refused_after_each_pause_cut_the_pace_only_once():
    time = FakeTime()
    gate = RequestGate(rate=1000.0, clock=time, sleep=time.sleep)
    for name in "abc":
        await gate(name)
    gate.throttled(ThrottledError(retry_after_s=1.0))
    assert gate.rate == 500.0
    for _ in range(4):  # the first request after each pause is refused again, alone
        await gate("probe")
        gate.throttled(ThrottledError(retry_after_s=1.0))
    assert gate.rate == 500.0
    assert time.now == pytest.approx(1004.003)  # each probe left only when its pause ended
    for name in "xy":
        await gate(name)
    gate.throttled(ThrottledError(retry_after_s=1.0))  # refused after two left: a new cut
    assert gate.rate == 250.0


@pytest.mark.anyio
async def test_a_hard_cap_bounds_the_pace_from_the_start():
    time = FakeTime()
    gate = RequestGate(rate=500.0, clock=time, sleep=time.sleep, hard_cap=2.0)
    for name in "abc":
        await gate(name)
    assert time.now == pytest.approx(1001.0)


@pytest.mark.anyio
async def test_an_export_waiting_for_its_turn_goes_before_polls():
    time = HeldTime()
    gate = RequestGate(rate=1.0, clock=time, sleep=time.sleep)
    await gate("v3.progress")  # takes the slot at 1000
    order = []

    async def poll(name):
        await gate("v3.progress")
        order.append(name)

    async def export():
        async with gate.turn("v3.project_export"):
            order.append("export")

    async with anyio.create_task_group() as tg:
        tg.start_soon(export)
        await anyio.wait_all_tasks_blocked()
        for name in ("poll-1", "poll-2"):
            tg.start_soon(poll, name)
        await anyio.wait_all_tasks_blocked()
        time.let_go.set()
    assert order[0] == "export"


@pytest.mark.anyio
async def test_pause_over_returns_only_once_a_pause_that_began_after_a_turn_ended():
    time = FakeTime()
    gate = RequestGate(rate=1.0, clock=time, sleep=time.sleep)
    async with gate.turn("/export"):
        paused_at = time.now
        gate.pause_for(3.0)  # a 429 elsewhere, after this turn was taken
        assert gate.paused
        await gate.pause_over()
        assert time.now >= paused_at + 3.0
        assert not gate.paused
