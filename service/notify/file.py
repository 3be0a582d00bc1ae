"""File target: one JSON line per event, appended and fsynced before it counts as delivered.

For setups with no broker and no receiver (a cron job tails the file). A line is on disk
before the outbox row is marked, so a crash can repeat a line but never lose one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from service.notify.sender import DeliveryError

if TYPE_CHECKING:
    from pathlib import Path

    from service.config import NotifyConfig
    from service.model import OutboxMessage


def append_line(path: Path, line: bytes) -> None:
    """Append `line` and a newline in one write, then fsync: blocking, run it in a thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = memoryview(line.rstrip(b"\n") + b"\n")
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class FileNotifier:
    """Append events to a JSONL file; writes are serialised so lines never interleave."""

    def __init__(self, target: NotifyConfig) -> None:
        if target.path is None:
            raise ValueError(f"notify target {target.name!r} has no path")
        self._path = target.path
        self._lock = anyio.Lock()

    async def deliver(self, message: OutboxMessage) -> None:
        """Write the payload as one line; a disk error is retried on the sender's schedule."""
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(append_line, self._path, message.payload)
            except OSError as exc:
                raise DeliveryError(f"cannot append to {self._path}: {exc.strerror}") from exc
