"""The outbox sender with a real SQLite store, real targets and a clock the test moves."""

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest

from service.config import NotifyConfig
from service.model import JobState, OutboxMessage
from service.notify.file import FileNotifier
from service.notify.payload import outbox_rows
from service.notify.sender import Notifier, OutboxSender, retry_delay_s
from service.notify.webhook import WebhookNotifier, webhook_id
from service.store.base import StoreUnavailableError
from service.store.sqlite import SQLiteStore
from tests.support.fakes import FakeClock
from tests.support.notify_fixtures import ready_job
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio


class ObservedStore(SQLiteStore):
    """The real store, reporting each outbox mark so tests await it instead of sleeping."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.send_mark, self.marks = anyio.create_memory_object_stream[tuple](100)
        self.fail_next_delivered = False
        self.count_failures_after_mark = 0
        self._count_failures = 0

    async def outbox_delivered(self, message_id: int) -> None:
        if self.fail_next_delivered:
            self.fail_next_delivered = False
            await self.send_mark.send(("mark_failed", message_id))
            raise StoreUnavailableError("disk full")
        await super().outbox_delivered(message_id)
        self._count_failures = self.count_failures_after_mark
        await self.send_mark.send(("delivered", message_id))

    async def outbox_pending_for_job(self, job_id: str) -> int:
        if self._count_failures:
            self._count_failures -= 1
            await self.send_mark.send(("count_failed", job_id))
            raise StoreUnavailableError("database is locked")
        return await super().outbox_pending_for_job(job_id)

    async def outbox_retry(self, message_id: int, next_attempt_at: float, error: str) -> None:
        await super().outbox_retry(message_id, next_attempt_at, error)
        await self.send_mark.send(("retry", message_id, next_attempt_at))

    async def outbox_dead(self, message_id: int, error: str) -> None:
        await super().outbox_dead(message_id, error)
        await self.send_mark.send(("dead", message_id, error))

    async def renew_outbox_claims(self, message_ids, now: float) -> None:
        await super().renew_outbox_claims(message_ids, now)
        await self.send_mark.send(("renewed", sorted(message_ids)))


class Harness:
    """A store, a clock, and a sender running in the test's task group."""

    def __init__(self, store: ObservedStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.done: list[str] = []
        self.done_failures = 0
        self._done_changed = anyio.Event()
        self.sender: OutboxSender | None = None

    async def job_done(self, job_id: str) -> None:
        if self.done_failures:
            self.done_failures -= 1
            await self.store.send_mark.send(("done_failed", job_id))
            raise StoreUnavailableError("database is locked")
        self.done.append(job_id)
        self._done_changed.set()
        self._done_changed = anyio.Event()

    async def wait_done(self, count: int) -> None:
        with anyio.fail_after(10):
            while len(self.done) < count:
                await self._done_changed.wait()

    async def add_ready_job(self, key: str, targets: list[NotifyConfig]) -> list[int]:
        event = sample_event(key)
        new_job = sample_job(event)
        await self.store.accept_event(event, [new_job])
        job = ready_job(
            job_id=new_job.job_id, event_id=event.event_id, export_name=new_job.export_name
        )
        rows = outbox_rows(job, "video.ready", targets)
        way = [JobState.RECEIVED, JobState.MAPPED, JobState.SUBMITTING, JobState.SUBMITTED]
        for current, following in itertools.pairwise(way):
            await self.store.transition(new_job.job_id, {current}, following)
        await self.store.transition(
            new_job.job_id, {JobState.SUBMITTED}, JobState.READY, outbox=rows
        )
        due = await self.store.due_outbox(self.clock() + 1e9)
        return [r.id for r in due if r.job_id == new_job.job_id]

    async def next_mark(self) -> tuple:
        with anyio.fail_after(10):
            return await self.store.marks.receive()

    def advance_to(self, when: float) -> None:
        self.clock.now = max(self.clock.now, when)
        assert self.sender is not None
        self.sender.wake()


@pytest.fixture
async def harness(tmp_path) -> AsyncIterator[Harness]:
    clock = FakeClock()
    store = ObservedStore(tmp_path / "state" / "studiohook.db", clock=clock)
    await store.open()
    try:
        yield Harness(store, clock)
    finally:
        store.send_mark.close()
        store.marks.close()
        await store.close()


async def start(tg, harness: Harness, targets: dict[str, Notifier], **kwargs) -> OutboxSender:
    kwargs.setdefault("max_attempts", 12)
    sender = OutboxSender(
        harness.store,
        targets,
        clock=harness.clock,
        rng=random.Random(7),  # noqa: S311 - retry jitter, not security
        on_job_delivered=harness.job_done,
        **kwargs,
    )
    harness.sender = sender
    await tg.start(sender.run)
    return sender


def hook_target(receiver) -> NotifyConfig:
    return NotifyConfig(name="crm", kind="webhook", url=receiver.url, secret=receiver.secret)


def test_retry_schedule_grows_is_jittered_and_capped():
    assert retry_delay_s(1, 0.5) == 5.0
    assert retry_delay_s(2, 0.5) == 30.0
    assert retry_delay_s(3, 0.5) == 120.0
    assert retry_delay_s(4, 0.5) == 600.0
    assert retry_delay_s(5, 0.5) == 3600.0
    assert retry_delay_s(50, 0.5) == retry_delay_s(7, 0.5) == 6 * 3600.0
    assert retry_delay_s(1, 0.0) == pytest.approx(4.0)
    assert retry_delay_s(1, 0.999999) == pytest.approx(6.0, rel=1e-5)


async def test_due_rows_reach_every_target_and_the_job_is_done_once(
    harness, webhook_receiver, tmp_path
):
    jsonl = tmp_path / "out" / "events.jsonl"
    file_target = NotifyConfig(name="log", kind="file", path=jsonl)
    webhook_receiver.answer(503)  # the webhook needs a second attempt; the file does not
    rows = await harness.add_ready_job("a", [file_target, hook_target(webhook_receiver)])
    order: list[tuple] = []
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"log": FileNotifier(file_target), "crm": hook})
        order += [await harness.next_mark(), await harness.next_mark()]
        [retry] = [m for m in order if m[0] == "retry"]
        assert harness.done == []
        harness.advance_to(retry[2])
        order.append(await harness.next_mark())
        await harness.wait_done(1)
        tg.cancel_scope.cancel()
    assert sorted(m[0] for m in order) == ["delivered", "delivered", "retry"]
    assert order[-1][0] == "delivered"
    assert harness.done == [sample_job(sample_event("a")).job_id]
    assert await harness.store.due_outbox(harness.clock() + 1e9) == []
    assert await harness.store.outbox_pending_for_job(harness.done[0]) == 0
    assert len(jsonl.read_bytes().splitlines()) == 1
    assert [r.signature_ok for r in webhook_receiver.received] == [True, True]
    assert len(rows) == 2


async def test_failures_back_off_on_the_schedule_and_keep_the_webhook_id(harness, webhook_receiver):
    for _ in range(3):
        webhook_receiver.answer(500)
    [row_id] = await harness.add_ready_job("b", [hook_target(webhook_receiver)])
    jitter = random.Random(7)  # noqa: S311 - retry jitter, not security
    expected = [retry_delay_s(n, jitter.random()) for n in (1, 2, 3)]
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        delays = []
        for _ in range(3):
            kind, got_id, due = await harness.next_mark()
            assert (kind, got_id) == ("retry", row_id)
            delays.append(due - harness.clock())
            assert await harness.store.due_outbox(harness.clock()) == []
            harness.advance_to(due)
        assert (await harness.next_mark())[:2] == ("delivered", row_id)
        tg.cancel_scope.cancel()
    assert delays == pytest.approx(expected)
    assert 4.0 <= delays[0] <= 6.0
    assert 24.0 <= delays[1] <= 36.0
    assert 96.0 <= delays[2] <= 144.0
    job = sample_job(sample_event("b"))
    ids = {r.webhook_id for r in webhook_receiver.received}
    assert ids == {webhook_id(job.job_id, job.export_name, "video.ready", "crm")}
    assert len(webhook_receiver.received) == 4
    assert all(r.signature_ok for r in webhook_receiver.received)


async def test_retry_after_from_a_429_is_honoured(harness, webhook_receiver):
    webhook_receiver.answer(429, {"Retry-After": "90"})
    [row_id] = await harness.add_ready_job("c", [hook_target(webhook_receiver)])
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        kind, _, due = await harness.next_mark()
        assert kind == "retry"
        assert due - harness.clock() == 90.0
        harness.advance_to(due)
        assert (await harness.next_mark())[:2] == ("delivered", row_id)
        tg.cancel_scope.cancel()


async def test_gone_kills_the_row_and_it_is_never_sent_again(harness, webhook_receiver):
    webhook_receiver.answer(410)
    [gone_id] = await harness.add_ready_job("d", [hook_target(webhook_receiver)])
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        kind, got_id, error = await harness.next_mark()
        assert (kind, got_id) == ("dead", gone_id)
        assert "410" in error
        await harness.wait_done(1)
        # A day later a new row for the same target is sent; the dead one is not.
        [later_id] = await harness.add_ready_job("e", [hook_target(webhook_receiver)])
        harness.advance_to(harness.clock() + 86400)
        assert (await harness.next_mark())[:2] == ("delivered", later_id)
        await harness.wait_done(2)
        tg.cancel_scope.cancel()
    assert len(webhook_receiver.received) == 2
    assert harness.done == [sample_job(sample_event(k)).job_id for k in ("d", "e")]


async def test_attempts_exhausted_kills_the_row(harness, webhook_receiver):
    for _ in range(5):
        webhook_receiver.answer(500)
    [row_id] = await harness.add_ready_job("f", [hook_target(webhook_receiver)])
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook}, max_attempts=2)
        kind, _, due = await harness.next_mark()
        assert kind == "retry"
        harness.advance_to(due)
        kind, got_id, error = await harness.next_mark()
        tg.cancel_scope.cancel()
    assert (kind, got_id) == ("dead", row_id)
    assert "gave up after 2 attempts" in error
    assert len(webhook_receiver.received) == 2


async def test_a_lost_mark_resends_with_the_same_webhook_id(harness, webhook_receiver):
    [row_id] = await harness.add_ready_job("g", [hook_target(webhook_receiver)])
    harness.store.fail_next_delivered = True
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        assert await harness.next_mark() == ("mark_failed", row_id)
        harness.advance_to(harness.clock() + 5)
        assert await harness.next_mark() == ("delivered", row_id)
        tg.cancel_scope.cancel()
    first, second = webhook_receiver.received
    assert first.webhook_id == second.webhook_id
    assert first.body == second.body


class Broken:
    async def deliver(self, message: OutboxMessage) -> None:
        raise RuntimeError(f"bug while sending {message.id}")


async def test_a_crashing_target_is_retried_and_an_unknown_target_is_dead(harness):
    [broken_id] = await harness.add_ready_job("h", [NotifyConfig(name="broken", kind="mqtt")])
    [orphan_id] = await harness.add_ready_job("i", [NotifyConfig(name="removed", kind="mqtt")])
    async with anyio.create_task_group() as tg:
        await start(tg, harness, {"broken": Broken()})
        marks = {(await harness.next_mark())[:2] for _ in range(2)}
        tg.cancel_scope.cancel()
    assert marks == {("retry", broken_id), ("dead", orphan_id)}
    pending = await harness.store.due_outbox(harness.clock() + 1e9)
    assert [(p.id, p.attempts) for p in pending] == [(broken_id, 1)]
    assert "bug while sending" in (pending[0].last_error or "")


async def test_concurrency_is_bounded(harness, tmp_path):
    targets = [NotifyConfig(name=f"t{i}", kind="file", path=tmp_path / "x") for i in range(5)]
    await harness.add_ready_job("j", targets)
    running = 0
    peak = 0
    release = anyio.Event()
    started: list[int] = []

    class Slow:
        async def deliver(self, message: OutboxMessage) -> None:
            nonlocal running, peak
            running += 1
            started.append(message.id)
            peak = max(peak, running)
            if peak == 2:
                release.set()
            await release.wait()
            running -= 1

    async with anyio.create_task_group() as tg:
        await start(tg, harness, {t.name: Slow() for t in targets}, max_concurrency=2)
        marks = [await harness.next_mark() for _ in range(5)]
        await harness.wait_done(1)
        tg.cancel_scope.cancel()
    assert peak == 2
    assert sorted(started) == sorted(set(started))
    assert len(started) == 5
    assert {m[0] for m in marks} == {"delivered"}
    assert harness.done == [sample_job(sample_event("j")).job_id]


async def test_a_failed_count_after_the_mark_is_retried_until_the_job_is_done(
    harness, webhook_receiver
):
    [row_id] = await harness.add_ready_job("k", [hook_target(webhook_receiver)])
    job_id = sample_job(sample_event("k")).job_id
    harness.store.count_failures_after_mark = 2  # the retry on the next loop turn fails too
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        assert await harness.next_mark() == ("delivered", row_id)
        assert await harness.next_mark() == ("count_failed", job_id)
        assert await harness.next_mark() == ("count_failed", job_id)
        harness.advance_to(harness.clock() + 5)
        await harness.wait_done(1)
        tg.cancel_scope.cancel()
    assert harness.done == [job_id]
    assert len(webhook_receiver.received) == 1


async def test_a_failed_job_transition_after_the_mark_is_retried(harness, webhook_receiver):
    [row_id] = await harness.add_ready_job("l", [hook_target(webhook_receiver)])
    job_id = sample_job(sample_event("l")).job_id
    harness.done_failures = 1
    async with (
        aclosing(WebhookNotifier(hook_target(webhook_receiver), clock=harness.clock)) as hook,
        anyio.create_task_group() as tg,
    ):
        await start(tg, harness, {"crm": hook})
        assert await harness.next_mark() == ("delivered", row_id)
        assert await harness.next_mark() == ("done_failed", job_id)
        harness.advance_to(harness.clock() + 5)
        await harness.wait_done(1)
        tg.cancel_scope.cancel()
    assert harness.done == [job_id]
    assert len(webhook_receiver.received) == 1


class Recording:
    """A target that counts deliveries and can hold the first one until released."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.release = anyio.Event()
        self.holding = anyio.Event()

    async def deliver(self, message: OutboxMessage) -> None:
        self.holding.set()
        await self.release.wait()
        self.delivered.append(message.id)


async def test_a_row_that_ends_during_a_scan_is_not_sent_again(harness):
    (row_id,) = await harness.add_ready_job("scan-race", [NotifyConfig(name="rec", kind="file")])
    target = Recording()
    real_due = harness.store.due_outbox
    stale: list = []
    scan_may_return = anyio.Event()

    async def slow_scan(now, limit=100):
        rows = await real_due(now, limit)
        if target.holding.is_set() and not stale:
            stale.extend(rows)  # read before the delivery below is marked
            await scan_may_return.wait()
        return rows

    harness.store.due_outbox = slow_scan
    async with anyio.create_task_group() as tg:
        sender = await start(tg, harness, {"rec": target})
        with anyio.fail_after(10):
            await target.holding.wait()
            sender.wake()  # a second scan starts while the row is being delivered
            while not stale:
                await anyio.sleep(0)
        target.release.set()
        assert await harness.next_mark() == ("delivered", row_id)
        await harness.wait_done(1)
        await anyio.wait_all_tasks_blocked()  # the delivery has ended; the scan still waits
        scan_may_return.set()  # it returns its snapshot, which still has the row as pending
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert [r.id for r in stale] == [row_id]
    assert target.delivered == [row_id]


async def test_the_claim_of_a_row_being_sent_is_renewed_until_its_delivery_ends(harness):
    # A slow target outlasts the scan's claim: the sender renews it while it waits, so another
    # instance does not take the row and announce it too.
    (row_id,) = await harness.add_ready_job("slow", [NotifyConfig(name="rec", kind="file")])
    target = Recording()
    async with anyio.create_task_group() as tg:
        await start(tg, harness, {"rec": target}, claim_renew_s=0.001)
        with anyio.fail_after(10):
            await target.holding.wait()
        assert await harness.next_mark() == ("renewed", [row_id])
        assert await harness.next_mark() == ("renewed", [row_id])  # again, for as long as it lasts
        target.release.set()
        while (mark := await harness.next_mark())[0] == "renewed":
            assert mark == ("renewed", [row_id])
        assert mark == ("delivered", row_id)
        await harness.wait_done(1)
        tg.cancel_scope.cancel()
    assert target.delivered == [row_id]


async def test_a_draining_sender_finishes_what_it_is_sending_and_starts_nothing_new(harness):
    # A graceful stop: the delivery under way is marked, so a restart does not send it again;
    # a row that was not started waits for the next start.
    (first,) = await harness.add_ready_job("under-way", [NotifyConfig(name="rec", kind="file")])
    target = Recording()
    drained = anyio.Event()
    async with anyio.create_task_group() as tg:
        sender = await start(tg, harness, {"rec": target})
        with anyio.fail_after(10):
            await target.holding.wait()

        async def drain() -> None:
            await sender.drain()
            drained.set()

        tg.start_soon(drain)
        (second,) = await harness.add_ready_job(
            "after-stop", [NotifyConfig(name="rec", kind="file")]
        )
        sender.wake()
        await anyio.wait_all_tasks_blocked()
        assert not drained.is_set()
        target.release.set()
        assert await harness.next_mark() == ("delivered", first)
        with anyio.fail_after(10):
            await drained.wait()
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert target.delivered == [first]
    assert [r.id for r in await harness.store.due_outbox(harness.clock() + 1e9)] == [second]


async def test_jobs_left_ready_are_settled_beside_the_deliveries_not_before_them(harness):
    # A crash after the last mark left a job `ready` with nothing to send. Settling it costs a
    # store query over the ready jobs; the sender reports started, and delivers, meanwhile.
    await harness.add_ready_job("left-ready", [])
    (row_id,) = await harness.add_ready_job("new", [NotifyConfig(name="rec", kind="file")])
    left, new = (sample_job(sample_event(key)).job_id for key in ("left-ready", "new"))
    real_scan = harness.store.ready_jobs_delivered
    counting = anyio.Event()
    count_may_return = anyio.Event()

    async def slow_scan(limit):
        if not count_may_return.is_set():
            counting.set()
            await count_may_return.wait()
        return await real_scan(limit)

    harness.store.ready_jobs_delivered = slow_scan
    target = Recording()
    target.release.set()
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await start(tg, harness, {"rec": target})
            await counting.wait()
        assert await harness.next_mark() == ("delivered", row_id)
        await harness.wait_done(1)
        assert harness.done == [new]
        count_may_return.set()
        await harness.wait_done(2)
        tg.cancel_scope.cancel()
    assert harness.done == [new, left]


async def test_on_a_shared_store_jobs_left_ready_later_are_settled_by_the_next_scan(harness):
    # Another instance died between its last delivery and the job's `notified` commit while
    # this one kept running: its start-up scan is long over, so the periodic one settles it.
    record_done = harness.job_done

    async def mark_notified(job_id: str) -> None:  # as the app's hook does
        await harness.store.transition(job_id, {JobState.READY}, JobState.NOTIFIED)
        await record_done(job_id)

    harness.job_done = mark_notified
    await harness.add_ready_job("left-before-start", [])
    async with anyio.create_task_group() as tg:
        await start(tg, harness, {}, settle_every_s=0.05)
        await harness.wait_done(1)
        await harness.add_ready_job("left-while-running", [])
        await harness.wait_done(2)
        tg.cancel_scope.cancel()
    assert harness.done == [
        sample_job(sample_event(key)).job_id for key in ("left-before-start", "left-while-running")
    ]
