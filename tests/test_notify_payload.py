"""The "Events out" contract, field by field."""

from datetime import datetime

import orjson
import pytest

from service.config import NotifyConfig
from service.model import JobState
from service.notify.payload import failed_payload, iso_utc, outbox_rows, ready_payload
from tests.support.notify_fixtures import ready_job

CONTRACT_READY = {
    "type",
    "job_id",
    "event_id",
    "source",
    "route",
    "project_id",
    "download_url",
    "progress",
    "submitted_at",
    "ready_at",
    "attempts",
}


def test_ready_payload_has_exactly_the_contract_fields():
    body = orjson.loads(ready_payload(ready_job(event_id="evt_1")))
    assert set(body) == CONTRACT_READY
    assert body == {
        "type": "video.ready",
        "job_id": "job_0123456789abcdef01234567",
        "event_id": "evt_1",
        "source": "shopify",
        "route": "new-product",
        "project_id": "proj_42",
        "download_url": "https://cdn.example.com/videos/proj_42.mp4",
        "progress": 100,
        "submitted_at": "2023-11-14T22:13:30.000Z",
        "ready_at": "2023-11-14T22:14:50.500Z",
        "attempts": 1,
    }


def test_times_are_iso_8601_utc():
    assert iso_utc(None) is None
    text = iso_utc(1_700_000_090.5)
    assert text is not None
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0
    assert parsed.timestamp() == 1_700_000_090.5


def test_failed_payload_carries_error_instead_of_download_url():
    job = ready_job(
        state=JobState.FAILED,
        download_url=None,
        ready_at=None,
        progress=42.4,
        error_code="render_deadline",
        error_message="no progress for 600 s",
        event_id="evt_2",
    )
    body = orjson.loads(failed_payload(job))
    assert set(body) == (CONTRACT_READY - {"download_url"}) | {"error"}
    assert body["type"] == "video.failed"
    assert body["error"] == {"code": "render_deadline", "message": "no progress for 600 s"}
    assert body["progress"] == 42
    assert body["ready_at"] is None
    assert body["submitted_at"] == "2023-11-14T22:13:30.000Z"


def test_failed_payload_without_recorded_error_still_has_code_and_message():
    job = ready_job(state=JobState.FAILED, project_id=None, submitted_at=None, event_id="evt_3")
    body = orjson.loads(failed_payload(job))
    assert body["error"] == {"code": "failed", "message": ""}
    assert body["project_id"] is None
    assert body["submitted_at"] is None


def test_outbox_rows_only_for_targets_subscribed_to_the_event_type():
    targets = [
        NotifyConfig(name="all", kind="mqtt"),
        NotifyConfig(name="ready-only", kind="webhook", url="http://x", events=("video.ready",)),
        NotifyConfig(name="failed-only", kind="file", events=("video.failed",)),
    ]
    job = ready_job(event_id="evt_1")
    ready = outbox_rows(job, "video.ready", targets)
    failed = outbox_rows(job, "video.failed", targets)
    assert [r.target for r in ready] == ["all", "ready-only"]
    assert [r.target for r in failed] == ["all", "failed-only"]
    assert {r.event_type for r in ready} == {"video.ready"}
    assert ready[0].payload == ready[1].payload == ready_payload(ready_job(event_id="evt_1"))
    assert orjson.loads(failed[0].payload)["type"] == "video.failed"


def test_event_id_is_the_one_the_job_carries():
    job = ready_job(event_id="evt_from_job")
    assert orjson.loads(ready_payload(job))["event_id"] == "evt_from_job"
    assert orjson.loads(failed_payload(job))["event_id"] == "evt_from_job"
    [row] = outbox_rows(job, "video.ready", [NotifyConfig(name="a", kind="mqtt")])
    assert orjson.loads(row.payload)["event_id"] == "evt_from_job"


def test_outbox_rows_reject_an_unknown_event_type():
    with pytest.raises(ValueError, match="unknown event type"):
        outbox_rows(ready_job(), "video.done", [NotifyConfig(name="a", kind="mqtt")])
