"""File target: JSON lines appended, fsynced, parseable."""

import os

import orjson
import pytest

from service.config import NotifyConfig
from service.model import OutboxMessage
from service.notify.file import FileNotifier
from service.notify.payload import failed_payload, ready_payload
from service.notify.sender import DeliveryError
from tests.support.notify_fixtures import ready_job

pytestmark = pytest.mark.anyio


async def test_appends_one_parseable_line_per_message(tmp_path):
    path = tmp_path / "deep" / "er" / "events.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"existing": true}\n')
    target = FileNotifier(NotifyConfig(name="log", kind="file", path=path))
    payloads = [
        ready_payload(ready_job(job_id=f"job_{i}", event_id=f"evt_{i}")) for i in range(5)
    ] + [failed_payload(ready_job(job_id="job_f", event_id="evt_f"))]
    for i, payload in enumerate(payloads):
        await target.deliver(
            OutboxMessage(id=i, job_id="j", target="log", event_type="x", payload=payload)
        )
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"existing": true}'
    assert [orjson.loads(line) for line in lines[1:]] == [orjson.loads(p) for p in payloads]
    assert path.read_bytes().endswith(b"\n")


async def test_each_line_is_fsynced_on_the_file_after_it_is_written(tmp_path, monkeypatch):
    # A power cut cannot be staged in a test, so os.fsync is observed (then really called):
    # which file each fsync was for, and how much of it had been written by then.
    path = tmp_path / "events.jsonl"
    synced = []
    real_fsync = os.fsync

    def observed_fsync(fd):
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino, info.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    target = FileNotifier(NotifyConfig(name="log", kind="file", path=path))
    sizes = []
    for i, payload in enumerate([b'{"a":1}', b'{"b":22}']):
        await target.deliver(
            OutboxMessage(id=i, job_id="j", target="log", event_type="x", payload=payload)
        )
        sizes.append(path.stat().st_size)
    info = path.stat()
    assert synced == [(info.st_dev, info.st_ino, size) for size in sizes]


async def test_creates_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "events.jsonl"
    target = FileNotifier(NotifyConfig(name="log", kind="file", path=path))
    await target.deliver(
        OutboxMessage(id=1, job_id="j", target="log", event_type="x", payload=b'{"a":1}')
    )
    assert path.read_bytes() == b'{"a":1}\n'


async def test_unwritable_path_is_a_retryable_delivery_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file")
    target = FileNotifier(NotifyConfig(name="log", kind="file", path=blocker / "events.jsonl"))
    with pytest.raises(DeliveryError) as failed:
        await target.deliver(
            OutboxMessage(id=1, job_id="j", target="log", event_type="x", payload=b"{}")
        )
    assert not failed.value.permanent
