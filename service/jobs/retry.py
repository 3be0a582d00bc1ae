"""What an operator's retry changes on a job: pure, so it is tested without a store."""

from __future__ import annotations

import re

from service.model import Job, JobUpdate

_RETRY_SUFFIX = re.compile(r"/r\d+$")


def retry_export_name(job: Job) -> str:
    """A fresh export name once the job has paid for an export.

    Reconciling by name can then never adopt the project of the attempt that failed.
    """
    base = _RETRY_SUFFIX.sub("", job.export_name)
    return f"{base}/r{job.attempts}" if job.attempts else base


def retry_update(job: Job) -> JobUpdate:
    """Clear the outcome of the last attempt; the stored event is mapped again from scratch."""
    return JobUpdate(
        export_name=retry_export_name(job),
        clear=frozenset(
            {
                "export_body",
                "project_id",
                "callback_token",
                "download_url",
                "submitted_at",
                "ready_at",
                "last_progress_at",
                "next_attempt_at",
                "error_code",
                "error_message",
            }
        ),
        progress=0.0,
        polls=0,
        note="retried by operator",
    )
