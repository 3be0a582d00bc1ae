"""The MQTT reader election over a lock that tests control: who reads, and when reading stops.

The real lock (PostgreSQL) is tested in test_store_lock.py and end to end, with real processes,
in test_e2e_instances.py; here a fake lock decides, so every branch runs in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest
from structlog.testing import capture_logs

from service.ingress.leadership import ReaderElection, reader_lock_name
from service.store.base import LockLostError, StoreUnavailableError

pytestmark = pytest.mark.anyio

CHECK_S = 0.02
WAIT_S = 5


@dataclass
class FakeLocks:
    """One lock shared by every election built on it; tests take it away or make it hang."""

    holder: object | None = None
    names: list[str] = field(default_factory=list)
    made: list[FakeLock] = field(default_factory=list)
    unavailable: bool = False
    hang: bool = False

    def exclusive_lock(self, name: str, *, lapse_s: float) -> FakeLock:
        assert lapse_s > CHECK_S * 2  # the lapse outlasts a check and its answer time
        self.names.append(name)
        self.made.append(FakeLock(self))
        return self.made[-1]


@dataclass(eq=False)
class FakeLock:
    locks: FakeLocks
    cut_off: bool = False

    async def try_acquire(self) -> bool:
        if self.locks.unavailable or self.cut_off:
            raise StoreUnavailableError("database down")
        if self.locks.holder is None:
            self.locks.holder = self
        return self.locks.holder is self

    async def check(self) -> None:
        if self.locks.hang:
            await anyio.sleep_forever()
        if self.locks.holder is not self or self.cut_off:
            raise LockLostError("connection lost")

    async def release(self) -> None:
        if self.locks.holder is self:
            self.locks.holder = None


class Reader:
    """Stands for the MQTT ingress: reports when first subscribed and first made to stop."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.stopped = anyio.Event()
        self.runs = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.runs += 1
        task_status.started()
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.stopped.set()


def roles(logs: list[dict[str, object]]) -> list[str]:
    return [str(e["event"]) for e in logs if str(e["event"]).startswith("mqtt.reader.")]


async def test_one_instance_reads_and_the_standby_takes_over_when_the_lock_is_lost():
    locks = FakeLocks()
    first_reader, second_reader = Reader(), Reader()
    first = ReaderElection(locks, client_id="c", read=first_reader.run, check_s=CHECK_S)
    second = ReaderElection(locks, client_id="c", read=second_reader.run, check_s=CHECK_S)
    with capture_logs() as logs, anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            assert first.role == "reader"
            assert first_reader.started.is_set()
            await tg.start(second.run)  # started once it knows it stands by
            assert second.role == "standby"
            assert second_reader.runs == 0

            locks.made[0].cut_off = True  # the first's connection died,
            locks.holder = None  # so the server freed its lock
            await first_reader.stopped.wait()
            await second_reader.started.wait()
            await anyio.wait_all_tasks_blocked()  # the first one has finished stepping down
            assert (first.role, second.role) == ("standby", "reader")
            tg.cancel_scope.cancel()
    assert locks.names == [reader_lock_name("c")] * 2
    # Once per change and instance: elected, standby (the second), standby (lost), elected.
    assert sorted(roles(logs)) == ["mqtt.reader.elected"] * 2 + ["mqtt.reader.standby"] * 2
    reasons = {e["reason"] for e in logs if e["event"] == "mqtt.reader.standby"}
    assert reasons == {"another instance is the reader", "connection lost"}
    assert locks.holder is None  # cancelled at shutdown: let go


async def test_a_lock_check_that_never_answers_stops_the_reading():
    locks = FakeLocks()
    reader = Reader()
    election = ReaderElection(locks, client_id="c", read=reader.run, check_s=CHECK_S)
    with capture_logs() as logs, anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(election.run)
            locks.hang = True
            await reader.stopped.wait()
            await anyio.wait_all_tasks_blocked()  # stepping down is logged
            tg.cancel_scope.cancel()
    standby = [e for e in logs if e["event"] == "mqtt.reader.standby"]
    assert standby[0]["reason"] == "lock check unanswered after 0.04 s"


async def test_an_unreachable_store_means_standing_by_and_reading_once_it_answers():
    locks = FakeLocks(unavailable=True)
    reader = Reader()
    election = ReaderElection(locks, client_id="c", read=reader.run, check_s=CHECK_S)
    with capture_logs() as logs, anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(election.run)
            assert election.role == "standby"
            locks.unavailable = False
            await reader.started.wait()
            tg.cancel_scope.cancel()
    assert roles(logs) == ["mqtt.reader.standby", "mqtt.reader.elected"]
    assert "database down" in str(logs[0]["reason"])
