"""Copies the WAL back into the database file on a thread and connection of its own.

SQLite checkpoints by itself inside the COMMIT that crosses 1,000 WAL pages: under webhook load
that is every dozen commits, and that commit then also reads the new pages back from the WAL,
writes them into the database file and fsyncs it, while every delivery of its group and of the
groups queued behind it waits. A PASSIVE checkpoint from another connection does the same work
beside the writer (it never blocks it, and SQLite's locks keep the two consistent), so the
writer's commits stay as short as their own pages. The WAL is still bounded: the checkpointer
runs every CHECKPOINT_EVERY_S while commits arrive. A checkpoint beside a busy writer never
quite catches up (new pages arrive while it copies), and SQLite starts the WAL over only after
one that did; so when one leaves little behind, it asks the writer to copy that little itself,
between two commits (`after_batch`), and the writer's next commit starts the WAL over; past
MAX_WAL_FRAMES it asks whatever is left.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

from service.log import get_logger

CHECKPOINT_EVERY_S = 0.05
"""How often the WAL is copied back while commits arrive: about a dozen commits under load."""
RESTART_FRAMES = 2000
"""A WAL this long (8 MB of 4 KB pages) is worth starting over..."""
CATCH_UP_FRAMES = 500
"""...once a checkpoint left at most this many frames (a few commits' pages) for the writer."""
MAX_WAL_FRAMES = 16_000
"""A writer so busy that no checkpoint gets that close still has its WAL started over here."""
WRITER_FALLBACK_COMMITS = 12
"""Without a checkpointer (its connection could not be opened), the writer checkpoints itself
after this many commits, about as often as SQLite's own 1,000-page default would."""

_log = get_logger("store.checkpointer")


class Checkpointer:
    """Runs PASSIVE checkpoints on its own connection after commits, never inside one."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._committed = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-checkpointer", daemon=True)
        self._failures = 0
        self._catch_up = threading.Event()
        self._on_writer = False
        self._commits_since = 0

    def after_batch(self, writer: sqlite3.Connection) -> None:
        """On the writer's thread after each batch: wake the checkpointer, copy what it left.

        Without a checkpointer, the writer checkpoints every WRITER_FALLBACK_COMMITS batches.
        A failure is left to the next try: the commits themselves are not affected.
        """
        self._commits_since += 1
        self._committed.set()
        if self._on_writer:
            if self._commits_since < WRITER_FALLBACK_COMMITS:
                return
            self._commits_since = 0
        elif self._catch_up.is_set():
            self._catch_up.clear()
        else:
            return
        try:
            writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            _log.warning("store_checkpoint_catch_up_failed", error=str(exc))

    def start(self) -> None:
        """Start the thread (it opens its connection there)."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the checkpoint under way and close the connection (blocking: run in a thread)."""
        self._stopping.set()
        self._committed.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            _log.error("store_checkpointer_unavailable", error=str(exc), fallback="writer")
            self._on_writer = True
            return
        try:
            while not self._stopping.is_set():
                self._committed.wait()  # a commit, or `stop`
                self._committed.clear()
                self._checkpoint(connection)
                self._stopping.wait(CHECKPOINT_EVERY_S)
        except Exception:  # noqa: BLE001 - a bug here must not leave the WAL to grow unseen
            _log.exception("store_checkpointer_failed", fallback="writer")
            self._on_writer = True
        finally:
            connection.close()

    def _checkpoint(self, connection: sqlite3.Connection) -> None:
        try:
            _, wal_frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            # The writer goes on; the WAL only grows until a checkpoint succeeds again.
            self._failures += 1
            if self._failures in {1, 10} or self._failures % 1000 == 0:
                _log.error("store_checkpoint_failed", error=str(exc), failures=self._failures)
        else:
            self._failures = 0
            left = wal_frames - copied
            if wal_frames >= MAX_WAL_FRAMES or (
                wal_frames >= RESTART_FRAMES and left <= CATCH_UP_FRAMES
            ):
                self._catch_up.set()
