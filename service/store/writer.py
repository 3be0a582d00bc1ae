"""Group commit: one writer thread owns the only write connection and batches callers.

Every write is a function of the connection. Whatever queued up while the previous commit was
being fsynced is run in ONE `BEGIN IMMEDIATE` transaction, each request inside its own
SAVEPOINT, so a hundred concurrent intakes pay for one fsync and a request that fails (a stale
compare-and-set, say) rolls back only itself. A failure of the database itself (I/O error,
full disk, lock timeout) aborts the whole batch and every caller gets StoreUnavailableError:
nothing of the batch is committed, so nobody may acknowledge anything.

Requests that cannot fail on their own (intake commits: dedupe, then inserts) may also name a
`Grouped` function that does the work of all of them at once, a few statements for the whole
group instead of several per request, under ONE savepoint (none when the group is the whole
transaction: a ROLLBACK undoes it then). The writer thread holds the GIL only between
statements, and wins it back from the event loop after each, so fewer statements leave more of
it to the event loop. Should the group function raise anyway, its work is rolled back and each
request of the group runs alone in its own savepoint, exactly as if it had never been grouped.
A batch that is one such group and nothing else may go further with `at_once`: the group as a
single statement that is its own transaction (BEGIN and COMMIT implied, fsync included), so
the writer hands the GIL over once per commit instead of once per statement. If that cannot be
(a duplicate, too many rows for one statement), SQLite has undone it and the batch is
committed the usual way.

Winning the GIL back is what a commit mostly waits for: a thread that wants it gets it only
when the holder lets go, and a busy event loop lets go on its own rarely, so the interpreter
forces the hand-over only after its switch interval (5 ms by default). Timed statement by
statement under webhook load (bench/intake.py), a group commit's statements took 7.7 ms of
wall time for 2.5 ms of CPU, COMMIT's fsync included; `start` therefore shortens the interval
for the process (see WRITER_SWITCH_INTERVAL_S).

Requests in one transaction were all pending at once, so none of their callers has seen
another's result: any order among them is a valid serial order, and a group runs where its
first request was queued.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio

from service.log import get_logger
from service.store.base import StoreUnavailableError

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], object]
Grouped = Callable[[sqlite3.Connection, list[Any]], list[Any]]
"""Does the work of a group of requests given their items; returns one value per item, in order."""
AtOnce = Callable[[sqlite3.Connection, list[Any]], list[Any] | None]
"""A group's work as one statement in autocommit, or None (nothing done) when it cannot be."""

_log = get_logger("store.writer")
_STOP = object()

WRITER_SWITCH_INTERVAL_S = 0.0005
"""The longest the writer waits for the GIL after a statement while the event loop is busy.

The interpreter's default is 5 ms; a commit runs several statements, each ending in such a
wait. At 0.5 ms the same commit's statements took 3.4 ms, and the event loop pays a thread
switch (microseconds) at most every 0.5 ms, and only while the writer is actually waiting.
"""


@dataclass(frozen=True, slots=True)
class _Request:
    work: Work
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    grouped: Grouped | None = None
    item: object = None
    at_once: AtOnce | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    value: object = None
    error: BaseException | None = None


def is_database_failure(exc: BaseException) -> bool:
    """True for errors of the database itself, False for errors of one statement or request.

    Constraint violations and misuse (IntegrityError, ProgrammingError, ...) belong to the
    request that caused them; I/O errors, a full disk, a lock timeout or a corrupt file belong
    to the store and make it unavailable.
    """
    return isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError) or (
        type(exc) is sqlite3.DatabaseError
    )


class GroupCommitWriter:
    """Runs write requests on a dedicated thread, many requests per transaction."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        max_batch: int,
        after_batch: Callable[[sqlite3.Connection], None] = lambda _: None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._connection = connection
        self._after_batch_hook = after_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._commit_count = 0
        self._write_count = 0
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    @property
    def commit_count(self) -> int:
        """Transactions committed so far; far below `write_count` when batching works."""
        return self._commit_count

    @property
    def write_count(self) -> int:
        """Write requests committed so far (including those that failed on their own)."""
        return self._write_count

    def start(self) -> None:
        """Start the writer thread; it owns the connection from now on.

        The process's GIL switch interval is lowered to WRITER_SWITCH_INTERVAL_S (never raised:
        a shorter one set by the application is kept).
        """
        if sys.getswitchinterval() > WRITER_SWITCH_INTERVAL_S:
            sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S)
        self._thread.start()

    async def submit(
        self,
        work: Callable[[sqlite3.Connection], T],
        *,
        grouped: Grouped | None = None,
        at_once: AtOnce | None = None,
        item: object = None,
    ) -> T:
        """Run `work` in the next transaction; return once that transaction is durable.

        With `grouped`, the requests of one transaction that name the same function are run
        together as `grouped(connection, [their items])`; `work` is what runs if that fails.
        With `at_once` too, a transaction of nothing but that group first tries it as one
        statement that is its own transaction (see `_commit_at_once`).
        A cancelled caller does not cancel its write: it may still commit, which the callers
        handle the way they handle a lost acknowledgement (dedupe, compare-and-set).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("store is closed")
            self._queue.put(_Request(work, loop, future, grouped, item, at_once))
        return cast("T", await future)

    async def stop(self) -> None:
        """Commit what is queued, then join the thread and close the connection."""
        with self._lock:
            already_closed = self._closed
            self._closed = True
            if not already_closed:
                self._queue.put(_STOP)
        if self._thread.is_alive():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._thread.join)

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = self._next_batch()
                if batch:
                    self._commit(batch)
                    self._after_batch()
        finally:
            with self._lock:
                self._closed = True
                leftovers = self._drain()
            self._settle(leftovers, [_Outcome(error=_closed_error()) for _ in leftovers])
            self._connection.close()

    def _after_batch(self) -> None:
        """The hook, once the batch's callers have their answers; it cannot stop the writes."""
        try:
            self._after_batch_hook(self._connection)
        except Exception:  # noqa: BLE001 - logged with its traceback; the writer goes on
            _log.exception("store_commit_hook_failed")

    def _next_batch(self) -> tuple[list[_Request], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [cast("_Request", first)]
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(cast("_Request", item))
        return batch, False

    def _drain(self) -> list[_Request]:
        leftovers: list[_Request] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return leftovers
            if item is not _STOP:
                leftovers.append(cast("_Request", item))

    def _commit(self, batch: list[_Request]) -> None:
        if self._commit_at_once(batch):
            return
        try:
            self._connection.execute("BEGIN IMMEDIATE")
            outcomes = self._apply_all(batch)
            self._connection.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            _log.error("store_commit_failed", error=str(exc), requests=len(batch))
            outcomes = [
                _Outcome(error=StoreUnavailableError(f"cannot commit: {exc}")) for _ in batch
            ]
        else:
            self._commit_count += 1
            self._write_count += len(batch)
        self._settle(batch, outcomes)

    def _commit_at_once(self, batch: list[_Request]) -> bool:
        """Commit a batch of one group as its single autocommit statement; False if not done.

        BEGIN, the group's statements and COMMIT each hand the GIL over and win it back from
        the event loop; one statement that is its own transaction does so once, fsync
        included. Durability is the same: SQLite commits it (synchronous=FULL) before the
        step returns. When the function declines (None) or fails on the batch's own data,
        nothing was committed and the batch takes the usual way, which says who failed.
        """
        at_once = self._at_once_of(batch)
        outcomes = None if at_once is None else self._run_at_once(at_once, batch)
        if outcomes is None:
            return False
        self._settle(batch, outcomes)
        return True

    def _run_at_once(self, at_once: AtOnce, batch: list[_Request]) -> list[_Outcome] | None:
        """The batch's outcomes; None when nothing was committed and the usual way should run."""
        try:
            values = at_once(self._connection, [r.item for r in batch])
        except sqlite3.Error as exc:
            if not is_database_failure(exc):
                return None
            self._rollback()
            _log.error("store_commit_failed", error=str(exc), requests=len(batch))
            failure = StoreUnavailableError(f"cannot commit: {exc}")
            return [_Outcome(error=failure) for _ in batch]
        except Exception:  # noqa: BLE001 - the usual way runs the batch again and reports it
            return None
        if values is None:
            return None
        self._commit_count += 1
        self._write_count += len(batch)
        if len(values) != len(batch):  # committed, but the answers cannot be matched: a bug
            error = RuntimeError(f"{at_once!r} returned {len(values)} values for {len(batch)}")
            return [_Outcome(error=error) for _ in batch]
        return [_Outcome(value=value) for value in values]

    def _at_once_of(self, batch: list[_Request]) -> AtOnce | None:
        """The batch's `at_once` when the batch is one group that has one; else None."""
        at_once = batch[0].at_once
        if at_once is None or self._connection.in_transaction:
            return None
        if any(r.grouped is not batch[0].grouped for r in batch):
            return None
        return at_once

    def _apply_all(self, batch: list[_Request]) -> list[_Outcome]:
        """Run every request: groups together, the rest alone; outcomes in `batch` order."""
        outcomes: dict[int, _Outcome] = {}
        groups: dict[Grouped, list[int]] = {}
        for index, request in enumerate(batch):
            if request.grouped is not None:
                groups.setdefault(request.grouped, []).append(index)
        done: set[Grouped] = set()
        for index, request in enumerate(batch):
            grouped = request.grouped
            if grouped is None:
                outcomes[index] = self._apply(request)
            elif grouped not in done:
                done.add(grouped)
                members = groups[grouped]
                alone = len(members) == len(batch)
                group_outcomes = self._apply_group(
                    grouped, [batch[i] for i in members], alone=alone
                )
                outcomes.update(zip(members, group_outcomes, strict=True))
        return [outcomes[index] for index in range(len(batch))]

    def _apply_group(
        self, grouped: Grouped, requests: list[_Request], *, alone: bool
    ) -> list[_Outcome]:
        """Run a group; `alone` (the group is the whole transaction) needs no savepoint.

        Each statement lets go of the GIL and has to win it back from the event loop, so the
        usual batch (intake commits only) saves two statements: a failed group is undone with
        ROLLBACK and a new BEGIN instead of a savepoint.
        """
        if len(requests) == 1:
            return [self._apply(requests[0])]
        if not alone:
            self._connection.execute("SAVEPOINT grouped")
        try:
            values = _run_grouped(grouped, self._connection, [r.item for r in requests])
        except sqlite3.Error as exc:
            if is_database_failure(exc):
                raise
            return self._ungroup(requests, exc, alone=alone)
        except Exception as exc:  # noqa: BLE001 - each request is retried alone, see below
            return self._ungroup(requests, exc, alone=alone)
        if not alone:
            self._connection.execute("RELEASE grouped")
        return [_Outcome(value=value) for value in values]

    def _ungroup(self, requests: list[_Request], exc: Exception, *, alone: bool) -> list[_Outcome]:
        """Undo the group's work and run each request alone: only the culprit gets an error."""
        if alone:
            self._connection.execute("ROLLBACK")
            self._connection.execute("BEGIN IMMEDIATE")
        else:
            self._connection.execute("ROLLBACK TO grouped")
            self._connection.execute("RELEASE grouped")
        _log.warning("store_group_split", requests=len(requests), error=repr(exc))
        return [self._apply(request) for request in requests]

    def _apply(self, request: _Request) -> _Outcome:
        self._connection.execute("SAVEPOINT request")
        try:
            value = request.work(self._connection)
        except sqlite3.Error as exc:
            if is_database_failure(exc):
                raise
            return self._undo(exc)
        except Exception as exc:  # noqa: BLE001 - the request's own error goes back to its caller
            return self._undo(exc)
        self._connection.execute("RELEASE request")
        return _Outcome(value=value)

    def _undo(self, exc: Exception) -> _Outcome:
        self._connection.execute("ROLLBACK TO request")
        self._connection.execute("RELEASE request")
        return _Outcome(error=exc)

    def _rollback(self) -> None:
        if not self._connection.in_transaction:
            return
        try:
            self._connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            _log.error("store_rollback_failed", error=str(exc))

    @staticmethod
    def _settle(batch: list[_Request], outcomes: list[_Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, _Outcome]]]
        by_loop = defaultdict(list)
        for request, outcome in zip(batch, outcomes, strict=True):
            by_loop[request.loop].append((request, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, settled)
            except RuntimeError:
                _log.warning("store_caller_loop_closed", requests=len(settled))


def _resolve(settled: list[tuple[_Request, _Outcome]]) -> None:
    for request, outcome in settled:
        if request.future.done():
            continue
        if outcome.error is not None:
            request.future.set_exception(outcome.error)
        else:
            request.future.set_result(outcome.value)


def _run_grouped(grouped: Grouped, connection: sqlite3.Connection, items: list[Any]) -> list[Any]:
    values = grouped(connection, items)
    if len(values) != len(items):
        raise RuntimeError(f"{grouped!r} returned {len(values)} values for {len(items)} items")
    return values


def _closed_error() -> StoreUnavailableError:
    return StoreUnavailableError("store is closed")
