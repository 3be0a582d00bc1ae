"""What an operator's retry changes on a job: pure, so it is tested without a store."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from service.model import Job, JobUpdate

_RETRY_SUFFIX = re.compile(r"/r\d+$")


def retry_export_name(job: Job, now: float) -> str:
    """A fresh export name, suffixed with the retry's time in epoch milliseconds.

    Reconciling by name can then never adopt the project of an earlier attempt. The name is
    stored on the job by the retry itself, so every later lookup of this attempt sees the same
    one; the attempt counter cannot serve here because a retry resets it.
    """
    base = _RETRY_SUFFIX.sub("", job.export_name)
    return f"{base}/r{int(now * 1000)}"


def mapped_export_name(stored: str, render: Callable[[], str]) -> str:
    """The name a job is mapped (and exported) under: the stored one once it has a readable part.

    The intake stores no name (rendering it is mapping work), so the first mapping renders it;
    a retry of a job that was never named keeps its `/r...` round suffix after the rendered
    name. A job already named keeps that name: a retry's round stays the round it renamed.
    """
    round_suffix = _RETRY_SUFFIX.search(stored)
    base = stored[: round_suffix.start()] if round_suffix else stored
    if base:
        return stored
    return render() + (round_suffix.group() if round_suffix else "")


def retry_update(job: Job, now: float | None = None) -> JobUpdate:
    """Clear the outcome of the last attempt; the stored event is mapped again from scratch.

    `attempts` goes back to 0: the retry budget (`max_retries`) is the new run's, or a job
    that failed by exhausting it would fail again at its first retryable error.
    """
    at = time.time() if now is None else now
    return JobUpdate(
        export_name=retry_export_name(job, at),
        attempts=0,
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
