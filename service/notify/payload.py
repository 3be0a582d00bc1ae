"""The "Events out" contract: what a consumer receives when a video is ready or has failed.

Pure and deterministic, so the bytes written to the outbox are the bytes every retry sends
(a webhook signature and a consumer's dedupe both depend on that). The field set is a public
contract: add fields, never rename or drop them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from service.model import Job, NewOutboxMessage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from service.config import NotifyConfig

VIDEO_READY = "video.ready"
VIDEO_FAILED = "video.failed"
BUDGET_EXHAUSTED = "budget.exhausted"
VIDEO_SUPERSEDED = "video.superseded"
EVENT_TYPES = frozenset({VIDEO_READY, VIDEO_FAILED, BUDGET_EXHAUSTED, VIDEO_SUPERSEDED})


def iso_utc(timestamp: float | None) -> str | None:
    """Epoch seconds -> `2024-05-01T12:00:00.000Z`, the one time format consumers parse."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _common(job: Job, event_type: str) -> dict[str, Any]:
    return {
        "type": event_type,
        "job_id": job.job_id,
        "event_id": job.event_id,
        "source": job.source,
        "route": job.route,
        "project_id": job.project_id,
    }


def ready_payload(job: Job) -> bytes:
    """Build the `video.ready` message.

    It is built at the ready commit, before any local copy exists: `download = true` targets
    add `video_path` / `video_sha256` at delivery (service/notify/local_copy.py).
    """
    body = _common(job, VIDEO_READY)
    body |= {
        "download_url": job.download_url,
        "progress": 100,
        "submitted_at": iso_utc(job.submitted_at),
        "ready_at": iso_utc(job.ready_at),
        "attempts": job.attempts,
    }
    if job.reused_from is not None:
        body["reused_from"] = job.reused_from
    return orjson.dumps(body)


def failed_payload(job: Job) -> bytes:
    """Build `video.failed`: the same fields, with `error` in place of `download_url`."""
    body = _common(job, VIDEO_FAILED)
    body |= {
        "progress": round(job.progress),
        "submitted_at": iso_utc(job.submitted_at),
        "ready_at": iso_utc(job.ready_at),
        "attempts": job.attempts,
        "error": {
            "code": job.error_code or "failed",
            "message": job.error_message or "",
        },
    }
    return orjson.dumps(body)


def budget_exhausted_payload(job: Job) -> bytes:
    """Build `budget.exhausted`: the first job a full cap held, with the cap and its period.

    Sent once per period (the store records the announcement with the hold); the held jobs
    are exported, in order, when the period rolls over or the cap is raised.
    """
    body = _common(job, BUDGET_EXHAUSTED)
    body |= {
        "state": "held",
        "error": {"code": job.error_code or "budget_exhausted", "message": job.error_message},
    }
    return orjson.dumps(body)


def outbox_rows(
    job: Job, event_type: str, targets: Sequence[NotifyConfig]
) -> list[NewOutboxMessage]:
    """One row per target subscribed to `event_type`, for the terminal transition to insert.

    The payload is built once, so every target announces exactly the same bytes. Rows carry
    the job's export name, its round: a retried job announces its new outcome again.
    """
    if event_type == VIDEO_READY:
        payload = ready_payload(job)
    elif event_type == VIDEO_FAILED:
        payload = failed_payload(job)
    elif event_type == BUDGET_EXHAUSTED:
        payload = budget_exhausted_payload(job)
    elif event_type == VIDEO_SUPERSEDED:
        body = _common(job, VIDEO_SUPERSEDED) | {"superseded_by": job.superseded_by}
        payload = orjson.dumps(body)
    else:
        raise ValueError(f"unknown event type {event_type!r}")
    return [
        NewOutboxMessage(
            target=target.name,
            event_type=event_type,
            payload=payload,
            export_name=job.export_name,
        )
        for target in targets
        if event_type in target.events
    ]
