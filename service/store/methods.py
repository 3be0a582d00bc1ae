"""Store methods whose logic is the same on every engine, shared by the engine classes.

The query wrappers stay in each engine: SQLite's queries are plain functions run on a worker
thread, PostgreSQL's are coroutines, and a hook typed for both would have to accept either
kind of callable, which neither engine can honestly do.
"""

from __future__ import annotations

from collections.abc import Callable


class OutboxListeners:
    """The sender's wake-up: engines call `_outbox_committed` after a commit added outbox rows."""

    def __init__(self) -> None:
        self._outbox_listeners: list[Callable[[], None]] = []

    def add_outbox_listener(self, listener: Callable[[], None]) -> None:
        """Called after every commit that inserted outbox rows (the sender's wake-up)."""
        self._outbox_listeners.append(listener)

    def _outbox_committed(self) -> None:
        for listener in self._outbox_listeners:
            listener()
