"""What only the SQLite engine promises: pragmas, group commit, batch isolation, failures."""

from __future__ import annotations

import sqlite3
import sys
import threading
from dataclasses import replace

import anyio
import pytest
from structlog.testing import capture_logs

from service.model import JobState
from service.store.base import StaleTransitionError, StoreUnavailableError
from service.store.schema import SCHEMA_VERSION
from service.store.sqlite import SQLiteStore
from service.store.writer import WRITER_SWITCH_INTERVAL_S
from tests.support.store_fixtures import sample_event, sample_job

pytestmark = pytest.mark.anyio


def rows_in(path, table: str) -> int:
    """Counted on a connection of the test's own, outside the store."""
    raw = sqlite3.connect(path)
    try:
        return raw.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608
    finally:
        raw.close()


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "store-writer"]


class WriterGate:
    """Holds the writer thread inside a request so the next requests pile up into one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, _connection: sqlite3.Connection) -> None:
        self.entered.set()
        self.release.wait(timeout=10)

    async def hold(self, store: SQLiteStore, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(store._write, self)
        await anyio.to_thread.run_sync(self.entered.wait)


async def test_open_creates_file_with_wal_and_schema(tmp_path):
    path = tmp_path / "deep" / "dir" / "studiohook.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "jobs", "transitions", "outbox"} <= tables
    raw.close()


async def test_concurrent_accepts_share_commits_and_are_all_durable(store):
    async def accept(n: int) -> None:
        event = sample_event(f"k{n}")
        await store.accept_event(event, [sample_job(event)])

    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(accept, n)

    assert store.write_count == 200
    assert store.commit_count <= 20, f"{store.commit_count} commits for 200 writes"
    assert rows_in(store.path, "events") == 200
    assert rows_in(store.path, "jobs") == 200


async def test_failed_cas_in_a_batch_rolls_back_only_itself(store):
    job_ids = []
    for n in range(6):
        event = sample_event(f"k{n}")
        job = sample_job(event)
        await store.accept_event(event, [job])
        job_ids.append(job.job_id)
    commits_before = store.commit_count
    outcomes: dict[str, object] = {}

    async def move(job_id: str, expected: JobState) -> None:
        try:
            outcomes[job_id] = await store.transition(job_id, {expected}, JobState.MAPPED)
        except StaleTransitionError as exc:
            outcomes[job_id] = exc

    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        for n, job_id in enumerate(job_ids):
            expected = JobState.RECEIVED if n % 2 == 0 else JobState.SUBMITTED
            tg.start_soon(move, job_id, expected)
        await anyio.wait_all_tasks_blocked()
        gate.release.set()

    assert store.commit_count == commits_before + 2  # the gate's batch, then all six together
    for n, job_id in enumerate(job_ids):
        job = await store.get_job(job_id)
        if n % 2 == 0:
            assert job.state is JobState.MAPPED
            assert len(await store.job_history(job_id)) == 2
        else:
            assert isinstance(outcomes[job_id], StaleTransitionError)
            assert job.state is JobState.RECEIVED
            assert len(await store.job_history(job_id)) == 1


async def test_close_commits_queued_writes_and_stops_the_thread(tmp_path):
    path = tmp_path / "studiohook.db"
    store = SQLiteStore(path)
    await store.open()
    assert len(writer_threads()) == 1
    results = []

    async def accept(n: int) -> None:
        results.append(await store.accept_event(sample_event(f"k{n}"), []))

    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        for n in range(10):
            tg.start_soon(accept, n)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(store.close)
        await anyio.wait_all_tasks_blocked()
        gate.release.set()

    assert len(results) == 10
    assert writer_threads() == []
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        again = await reopened.accept_event(sample_event("k9"), [])
    finally:
        await reopened.close()
    assert again.duplicate


async def test_cancelled_caller_does_not_break_the_writer(store):
    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        with anyio.move_on_after(0.01) as scope:
            await store.accept_event(sample_event("cancelled"), [])
        gate.release.set()
    assert scope.cancelled_caught
    later = await store.accept_event(sample_event("cancelled"), [])
    assert later.duplicate  # the cancelled write still committed
    await store.ping()


async def test_locked_database_is_unavailable_then_recovers(tmp_path):
    path = tmp_path / "studiohook.db"
    store = SQLiteStore(path, busy_timeout_s=0.05)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailableError, match="locked"):
            await store.accept_event(sample_event("k1"), [])
        other.execute("ROLLBACK")
        accepted = await store.accept_event(sample_event("k1"), [])
        assert not accepted.duplicate
    finally:
        other.close()
        await store.close()


async def test_full_disk_fails_the_whole_batch_and_commits_nothing(store):
    def fill_limit(connection: sqlite3.Connection) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")

    await store._write(fill_limit)
    big = replace(sample_event("big"), body=b"x" * 200_000)

    outcomes: list[BaseException | None] = []

    async def accept(event) -> None:
        try:
            await store.accept_event(event, [])
            outcomes.append(None)
        except StoreUnavailableError as exc:
            outcomes.append(exc)

    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        tg.start_soon(accept, sample_event("small"))
        tg.start_soon(accept, big)
        await anyio.wait_all_tasks_blocked()
        gate.release.set()

    assert len(outcomes) == 2
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)
    assert "full" in str(outcomes[0])
    await store._write(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    assert not (await store.accept_event(sample_event("small"), [])).duplicate


async def test_open_fails_unavailable_where_no_database_can_be(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailableError):
        await SQLiteStore(blocker / "studiohook.db").open()

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(StoreUnavailableError):
        await SQLiteStore(garbage).open()
    assert writer_threads() == []


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "studiohook.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreUnavailableError, match="newer"):
        await SQLiteStore(path).open()


async def test_reads_run_while_the_writer_is_busy(store):
    event = sample_event("k1")
    await store.accept_event(event, [sample_job(event)])
    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        with anyio.fail_after(5):
            job = await store.get_job(sample_job(event).job_id)
        gate.release.set()
    assert job is not None


async def test_a_move_the_state_machine_does_not_allow_is_refused_and_not_written(store):
    event = sample_event("skips-submitting")
    job = sample_job(event)
    await store.accept_event(event, [job])
    await store.transition(job.job_id, {JobState.RECEIVED}, JobState.MAPPED)

    with pytest.raises(ValueError, match="mapped -> submitted") as refused:
        await store.transition(
            job.job_id, {JobState.MAPPED, JobState.SUBMITTING}, JobState.SUBMITTED
        )

    assert "not allowed" in str(refused.value)
    assert (await store.get_job(job.job_id)).state is JobState.MAPPED
    assert [t.to_state for t in await store.job_history(job.job_id)] == [
        JobState.RECEIVED,
        JobState.MAPPED,
    ]


async def test_accepts_in_one_batch_are_grouped_and_duplicates_get_the_first_ids(store):
    stored = sample_event("old")
    original = await store.accept_event(stored, [sample_job(stored)])
    events = [sample_event(f"g{n}") for n in range(5)]
    second_delivery = replace(events[2], event_id="evt-retry", body=b'{"id": 2}')
    outcomes: dict[str, object] = {}

    async def accept(name: str, event, jobs) -> None:
        outcomes[name] = await store.accept_event(event, jobs)

    gate = WriterGate()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await gate.hold(store, tg)
            for n, event in enumerate(events):
                jobs = [sample_job(event), sample_job(event, "b")]
                tg.start_soon(accept, f"new{n}", event, jobs)
            tg.start_soon(accept, "retry", second_delivery, [sample_job(second_delivery)])
            tg.start_soon(accept, "old", replace(stored, body=b"{}"), [])
            await anyio.wait_all_tasks_blocked()
            commits_before = store.commit_count
            gate.release.set()

    assert store.commit_count == commits_before + 2  # the gate's batch, then the group
    assert [e for e in logs if e["event"] == "store_group_split"] == []
    for n, event in enumerate(events):
        acceptance = outcomes[f"new{n}"]
        assert not acceptance.duplicate
        assert acceptance.job_ids == (sample_job(event).job_id, sample_job(event, "b").job_id)
        for job_id in acceptance.job_ids:
            job = await store.get_job(job_id)
            assert job.event_id == event.event_id
            assert [t.to_state for t in await store.job_history(job_id)] == [JobState.RECEIVED]
    retry = outcomes["retry"]
    assert retry.duplicate
    assert (retry.event_id, retry.job_ids) == (events[2].event_id, outcomes["new2"].job_ids)
    old = outcomes["old"]
    assert old.duplicate
    assert (old.event_id, old.job_ids) == (original.event_id, original.job_ids)
    assert rows_in(store.path, "events") == 6
    assert rows_in(store.path, "jobs") == 11


async def test_a_group_that_fails_is_split_and_only_the_culprit_fails(store):
    taken = sample_event("taken")
    await store.accept_event(taken, [sample_job(taken)])
    events = [sample_event(f"s{n}") for n in range(4)]
    # A job id that already belongs to another event: this request alone must fail.
    clash = [replace(sample_job(events[1]), job_id=sample_job(taken).job_id)]
    outcomes: dict[int, object] = {}

    async def accept(n: int) -> None:
        jobs = clash if n == 1 else [sample_job(events[n])]
        try:
            outcomes[n] = await store.accept_event(events[n], jobs)
        except sqlite3.IntegrityError as exc:
            outcomes[n] = exc

    gate = WriterGate()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await gate.hold(store, tg)
            for n in range(len(events)):
                tg.start_soon(accept, n)
            await anyio.wait_all_tasks_blocked()
            gate.release.set()

    assert [e["requests"] for e in logs if e["event"] == "store_group_split"] == [4]
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    for n in (0, 2, 3):
        assert not outcomes[n].duplicate
        assert await store.get_job(sample_job(events[n]).job_id) is not None
    raw = sqlite3.connect(store.path)
    try:
        keys = {r[0] for r in raw.execute("SELECT dedupe_key FROM events")}
    finally:
        raw.close()
    assert keys == {"taken", "s0", "s2", "s3"}


class LimitingGate(WriterGate):
    """A WriterGate that first lowers the writer connection's bound on parameters per statement."""

    def __init__(self, max_parameters: int) -> None:
        super().__init__()
        self.max_parameters = max_parameters

    def __call__(self, connection: sqlite3.Connection) -> None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, self.max_parameters)
        super().__call__(connection)


async def test_a_large_group_fits_sqlite_builds_limited_to_999_parameters(store):
    """SQLite before 3.32 binds at most 999 values per statement; 150 events with 2 jobs each
    (12 values a job row) are far more than that and must still commit as one group."""
    events = [sample_event(f"big{n}") for n in range(150)]
    outcomes: dict[int, object] = {}

    async def accept(n: int) -> None:
        outcomes[n] = await store.accept_event(
            events[n], [sample_job(events[n]), sample_job(events[n], "b")]
        )

    gate = LimitingGate(999)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await gate.hold(store, tg)
            for n in range(len(events)):
                tg.start_soon(accept, n)
            await anyio.wait_all_tasks_blocked()
            commits_before = store.commit_count
            gate.release.set()

    assert store.commit_count == commits_before + 2  # the gate's batch, then the group
    assert [e for e in logs if e["event"] == "store_group_split"] == []
    assert all(not outcomes[n].duplicate for n in range(len(events)))
    assert rows_in(store.path, "events") == 150
    assert rows_in(store.path, "jobs") == 300
    assert rows_in(store.path, "transitions") == 300


async def test_the_writer_shortens_the_gil_switch_interval_and_never_lengthens_it(tmp_path):
    saved = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        first = SQLiteStore(tmp_path / "a.db")
        await first.open()
        await first.close()
        assert sys.getswitchinterval() == pytest.approx(WRITER_SWITCH_INTERVAL_S)
        sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S / 5)
        second = SQLiteStore(tmp_path / "b.db")
        await second.open()
        await second.close()
        assert sys.getswitchinterval() == pytest.approx(WRITER_SWITCH_INTERVAL_S / 5)
    finally:
        sys.setswitchinterval(saved)


class TracingGate(WriterGate):
    """A WriterGate that records every statement the writer connection runs from then on."""

    def __init__(self) -> None:
        super().__init__()
        self.statements: list[str] = []

    def __call__(self, connection: sqlite3.Connection) -> None:
        connection.set_trace_callback(self.statements.append)
        super().__call__(connection)


async def test_a_batch_of_new_events_is_one_statement_that_commits_itself(store):
    """Every statement lets go of the GIL and waits to win it back: a batch of 13 new events
    with a job each is one INSERT, with no BEGIN or COMMIT of its own (autocommit)."""
    events = [sample_event(f"one{n}") for n in range(13)]

    async def accept(n: int) -> None:
        await store.accept_event(events[n], [sample_job(events[n])])

    gate = TracingGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        for n in range(len(events)):
            tg.start_soon(accept, n)
        await anyio.wait_all_tasks_blocked()
        commits_before = store.commit_count
        gate.release.set()

    assert store.commit_count == commits_before + 2  # the gate's batch, then the 13
    # The trace repeats a statement's text for each trigger program it runs: count it once.
    top_level = [s for n, s in enumerate(gate.statements) if n == 0 or gate.statements[n - 1] != s]
    after_gate = top_level[top_level.index("COMMIT") + 1 :]
    kinds = [s.split(" VALUES")[0] for s in after_gate if not s.startswith("PRAGMA")]
    assert kinds == ["INSERT INTO intake_rows"]
    raw = sqlite3.connect(store.path)
    try:
        rows = raw.execute(
            "SELECT e.dedupe_key, j.job_id, t.to_state FROM events e"
            " JOIN jobs j ON j.event_row = e.id JOIN transitions t ON t.job_id = j.job_id"
        ).fetchall()
    finally:
        raw.close()
    assert sorted(rows) == sorted(
        (e.dedupe_key, sample_job(e).job_id, JobState.RECEIVED.value) for e in events
    )


async def test_the_wal_is_copied_back_beside_the_writer_and_stays_bounded(store):
    """No commit checkpoints (wal_autocheckpoint=0 on the writer); the checkpointer does, and
    hands the writer the last few pages so the WAL starts over: 2,000 events of 16 KB would
    make a 32 MB WAL without it, and every event is in the database file afterwards."""
    body = bytes(range(256)) * 64
    written = 0
    biggest = 0
    wal = store.path.with_name(store.path.name + "-wal")

    async def accept(key: str) -> None:
        await store.accept_event(replace(sample_event(key), body=body), [])

    for group in range(40):
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(accept, f"w{group}-{n}")
        written += 50 * len(body)
        biggest = max(biggest, wal.stat().st_size)
        await anyio.sleep(0.01)  # the checkpointer's turn comes between commits, as under load

    autocheckpoint = await store._write(
        lambda connection: connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    )
    assert autocheckpoint == 0
    assert rows_in(store.path, "events") == 2000
    assert written >= 32_000_000
    assert biggest < written / 2


async def test_without_its_checkpointer_the_writer_checkpoints_itself(tmp_path, monkeypatch):
    """The checkpointer's connection cannot be opened: an error says so, and the writer copies
    the WAL back itself every dozen commits, so the WAL still stays bounded."""

    def refuse(_self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(SQLiteStore, "_open_checkpoint_connection", refuse)
    store = SQLiteStore(tmp_path / "alone.db")
    body = bytes(range(256)) * 64
    biggest = 0
    with capture_logs() as logs:
        await store.open()
        try:
            for n in range(400):
                await store.accept_event(replace(sample_event(f"a{n}"), body=body), [])
                biggest = max(biggest, store.path.with_name("alone.db-wal").stat().st_size)
        finally:
            await store.close()
    assert [e["event"] for e in logs if e.get("fallback") == "writer"] == [
        "store_checkpointer_unavailable"
    ]
    assert biggest < 400 * len(body) / 4


@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "mixed-with-other-writes"])
async def test_a_stored_duplicate_late_in_a_group_of_20_leaves_the_others_new(store, mixed):
    """20 rows are more than one of `_insert_many`'s statements (16 + 4): the fast path must
    still be all or nothing, or the first 16 events would be committed, found again by the
    duplicate lookup and answered as duplicates. Alone, the group is its own transaction;
    mixed with another write, it runs inside the batch's transaction."""
    stored = sample_event("k18")
    original = await store.accept_event(stored, [sample_job(stored)])
    events = [sample_event(f"k{n}") for n in range(20)]
    outcomes: dict[int, object] = {}

    async def accept(n: int) -> None:
        outcomes[n] = await store.accept_event(events[n], [sample_job(events[n])])

    gate = WriterGate()
    async with anyio.create_task_group() as tg:
        await gate.hold(store, tg)
        for n in range(len(events)):
            tg.start_soon(accept, n)
        if mixed:
            tg.start_soon(store._write, lambda _connection: None)
        await anyio.wait_all_tasks_blocked()
        commits_before = store.commit_count
        gate.release.set()

    assert store.commit_count == commits_before + 2  # the gate's batch, then the group
    assert outcomes[18].duplicate
    assert (outcomes[18].event_id, outcomes[18].job_ids) == (original.event_id, original.job_ids)
    assert [n for n in range(20) if outcomes[n].duplicate] == [18]
    assert rows_in(store.path, "events") == 20
    assert rows_in(store.path, "jobs") == 20
    assert rows_in(store.path, "transitions") == 20


async def test_a_job_field_with_a_nul_character_is_stored_whole(store):
    """The fast path carries job fields through JSON, which SQLite cuts at U+0000; such a
    delivery takes the older way, and the field is stored as given."""
    event = sample_event("nul")
    job = replace(sample_job(event), error_code="bad", error_message="bad\x00tail")
    await store.accept_event(event, [job])
    stored = await store.get_job(job.job_id)
    assert stored.error_message == "bad\x00tail"
