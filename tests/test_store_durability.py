"""An acknowledged commit survives the process being killed with SIGKILL right after."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import pytest

from service.store.sqlite import SQLiteStore
from tests.support.store_fixtures import sample_event

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]

WRITER_SCRIPT = """
import sys
from pathlib import Path

import anyio

from service.model import InboundEvent
from service.store.sqlite import SQLiteStore


async def main() -> None:
    store = SQLiteStore(Path(sys.argv[1]))
    await store.open()
    n = 0
    while True:
        event = InboundEvent("shop", f"k{n}", f"evt-k{n}", "t", b"{}", {}, 1.0)
        await store.accept_event(event, [])
        print("ack", n, flush=True)
        n += 1


anyio.run(main)
"""


async def test_acknowledged_writes_survive_kill_9(tmp_path):
    path = tmp_path / "studiohook.db"
    acknowledged: list[int] = []
    async with await anyio.open_process(
        [sys.executable, "-c", WRITER_SCRIPT, str(path)], cwd=REPO, stderr=None
    ) as process:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(30):
            while len(acknowledged) < 50:
                buffer += await process.stdout.receive()
                *lines, buffer = buffer.split(b"\n")
                acknowledged += [int(line[4:]) for line in lines if line.startswith(b"ack ")]
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL

    store = SQLiteStore(path)
    await store.open()
    try:
        for n in acknowledged:
            again = await store.accept_event(sample_event(f"k{n}"), [])
            assert again.duplicate, f"acknowledged event k{n} was lost"
    finally:
        await store.close()
