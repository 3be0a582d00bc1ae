"""Frozen value objects shared by every part of studiohook.

Everything that crosses a boundary (ingress -> store, store -> jobs, jobs -> notify) is one of
these, so the core never handles raw wire dicts except as an event's payload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is on its way from an event to a delivered "video ready".

    Each transition is its own committed transaction; `ALLOWED_TRANSITIONS` lists the moves the
    store accepts.
    """

    RECEIVED = "received"
    MAPPED = "mapped"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    READY = "ready"
    NOTIFIED = "notified"
    IGNORED = "ignored"
    REJECTED = "rejected"
    FAILED = "failed"
    RECONCILE = "reconcile"
    HELD = "held"
    """Ready to export, but a spending cap is reached: waits for the period or a raised cap."""
    SUPERSEDED = "superseded"
    """Coalesced into a newer job for the same key before it was submitted (`superseded_by`)."""


TERMINAL_STATES = frozenset(
    {
        JobState.NOTIFIED,
        JobState.IGNORED,
        JobState.REJECTED,
        JobState.FAILED,
        JobState.SUPERSEDED,
    }
)

ALLOWED_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    # received|mapped|held -> superseded: coalesced into a newer job, never once submitted.
    JobState.RECEIVED: frozenset(
        {JobState.MAPPED, JobState.REJECTED, JobState.IGNORED, JobState.SUPERSEDED}
    ),
    # mapped -> failed: the stored export body is unusable, so there is nothing to POST.
    # mapped -> held: the paid call would exceed a spending cap (decided in its transaction).
    # mapped -> ready: the render cache reuses an identical earlier video; nothing is posted.
    JobState.MAPPED: frozenset(
        {JobState.SUBMITTING, JobState.FAILED, JobState.HELD, JobState.READY, JobState.SUPERSEDED}
    ),
    # held -> mapped: released, in order, once the period rolled over or the cap was raised.
    JobState.HELD: frozenset({JobState.MAPPED, JobState.SUPERSEDED}),
    JobState.SUPERSEDED: frozenset(),
    # submitting -> mapped only for a retryable error that certainly created nothing.
    JobState.SUBMITTING: frozenset(
        {JobState.SUBMITTED, JobState.RECONCILE, JobState.FAILED, JobState.MAPPED}
    ),
    # reconcile -> mapped only after the project list showed no such export after the wait.
    JobState.RECONCILE: frozenset({JobState.SUBMITTED, JobState.MAPPED, JobState.FAILED}),
    JobState.SUBMITTED: frozenset({JobState.READY, JobState.FAILED}),
    JobState.READY: frozenset({JobState.NOTIFIED}),
    # notified -> received only for an operator's deliberate re-render (a new round, paid again).
    JobState.NOTIFIED: frozenset({JobState.RECEIVED}),
    JobState.IGNORED: frozenset(),
    # An operator's retry sends a failed or rejected job back to be mapped from its event.
    JobState.FAILED: frozenset({JobState.MAPPED, JobState.RECEIVED}),
    JobState.REJECTED: frozenset({JobState.MAPPED, JobState.RECEIVED}),
}
"""Every move a job may make. The store refuses any other: the money rule is here too, as the
only ways into `submitted` are `submitting` and `reconcile` (where the export was found)."""

REFUNDING_MOVES: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.SUBMITTING, JobState.MAPPED),
        (JobState.SUBMITTING, JobState.FAILED),
        (JobState.RECONCILE, JobState.MAPPED),
    }
)
"""Moves that prove the paid call committed last created nothing (a 429, a refusal, a lookup
that found no export): the store takes that call's spend record back in the same transaction,
so the spending caps count billed exports only. `reconcile -> failed` is not one: there the
outcome stayed unknown, and an unknown export is counted as spent."""


API_V3 = "v3"
"""A v3 job exported in two steps: an unbilled draft, its id committed, then the paid export."""
API_V3_ONE_STEP = "v3-one-step"
"""A v3 job created and exported in one paid call (seed 000's), reconciled by its name."""
API_LEGACY = "legacy"
"""A job exported through the older import-modify-export API."""
V3_APIS = frozenset({API_V3, API_V3_ONE_STEP})


class EventStatus(StrEnum):
    """What became of an inbox event: routed to jobs, matched no route, or dead-lettered.

    A dead letter is a delivery some step could not use (unreadable payload, a handler, dedupe
    expression, `when` or export name that raised): kept with its reason for `events replay`.
    """

    ROUTED = "routed"
    IGNORED = "ignored"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One verified delivery, exactly as it arrived, ready to be committed to the inbox.

    `dedupe_key` is unique per source: a second delivery with the same key is the same event.
    """

    source: str
    dedupe_key: str
    event_id: str
    event_type: str
    body: bytes
    headers: Mapping[str, str]
    received_at: float
    reason: str | None = None
    """Set for a dead letter: the exception type and message that made the delivery unusable."""
    failed_step: str | None = None
    """Set for a dead letter: which step raised (`handler`, `dedupe_key`, `routes.NAME.when`)."""


@dataclass(frozen=True, slots=True)
class RawEvent:
    """A verified delivery as a handler sees it: parsed JSON payload plus where it came from.

    `headers` keys are lower-case. `topic` is set for MQTT deliveries only.
    """

    source: str
    payload: Any
    headers: Mapping[str, str]
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class HandledEvent:
    """What a handler makes of a raw event: its id, its type and a source-neutral context."""

    event_id: str | None
    event_type: str | None
    context: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job decided at intake (a route matched) and committed together with its event.

    `export_name` is empty for a job made by the intake: rendering it is mapping work, done
    when the job is mapped (see `service.jobs.prepare`), so it never slows an acknowledgement.
    """

    job_id: str
    route: str
    export_name: str = ""
    state: JobState = JobState.RECEIVED
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The answer to an intake commit: the event's id, its jobs, and whether it was seen before."""

    event_id: str
    job_ids: tuple[str, ...]
    duplicate: bool
    status: EventStatus = EventStatus.ROUTED


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An inbox row: the event as committed, with its store id and what became of it."""

    id: int
    source: str
    dedupe_key: str
    event_id: str
    event_type: str
    body: bytes
    headers: Mapping[str, str]
    received_at: float
    status: EventStatus
    reason: str | None = None
    failed_step: str | None = None
    replays: int = 0
    """How many times an operator replayed the event through the configuration of the day."""


@dataclass(frozen=True, slots=True)
class ReplayedJob:
    """One route's answer to a replay: a job made now, or the one that already existed."""

    job_id: str
    route: str
    state: JobState
    created: bool
    rerendered: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """What replaying one stored event did; `duplicate_of` names the row it turned out to be."""

    event: StoredEvent
    jobs: tuple[ReplayedJob, ...]
    duplicate_of: int | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One paid export and everything needed to follow it to the end after a crash."""

    job_id: str
    event_row: int
    source: str
    route: str
    state: JobState
    export_name: str
    created_at: float
    updated_at: float
    export_body: bytes | None = None
    project_id: str | None = None
    api: str = "v3"
    callback_token: str | None = None
    progress: float = 0.0
    download_url: str | None = None
    attempts: int = 0
    submitted_at: float | None = None
    ready_at: float | None = None
    last_progress_at: float | None = None
    next_attempt_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    video_path: str | None = None
    video_sha256: str | None = None
    polls: int = 0
    event_id: str = ""
    """The originating event's id, carried so announcements never need a second read."""
    owner: str | None = None
    """The worker that claimed the job last (see `Store.claim_job`)."""
    lease_until: float | None = None
    """Until when that claim holds; after it, any worker may take the job over."""
    fence: int = 0
    """Bumped by every claim: a transition naming an older fence is refused."""
    render_key: str | None = None
    """The canonical export body's digest, committed with the paid call: the render cache's key."""
    reused_from: str | None = None
    """The job whose video this one reused (the render cache), instead of exporting."""
    coalesce_key: str | None = None
    """`route:key` of a coalescing route: newer events with the same key supersede this job."""
    superseded_by: str | None = None
    """The newer job that replaced this one (state `superseded`)."""


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """The fields a transition changes; `None` leaves a field as it is, `clear` empties one."""

    export_body: bytes | None = None
    project_id: str | None = None
    api: str | None = None
    callback_token: str | None = None
    progress: float | None = None
    download_url: str | None = None
    attempts: int | None = None
    submitted_at: float | None = None
    ready_at: float | None = None
    last_progress_at: float | None = None
    next_attempt_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    video_path: str | None = None
    video_sha256: str | None = None
    polls: int | None = None
    export_name: str | None = None
    render_key: str | None = None
    reused_from: str | None = None
    coalesce_key: str | None = None
    superseded_by: str | None = None
    clear: frozenset[str] = frozenset()
    """Fields set back to NULL (an operator's retry clears the last attempt's outcome)."""
    note: str | None = None


@dataclass(frozen=True, slots=True)
class SpendCap:
    """One spending limit as it applies right now: at most `limit` paid calls since `since`.

    `route` narrows the count to one route's calls (None: every route). `period` names the
    period ("day:2026-12-01", "month:2026-12", "route:shop:day:2026-12-01"): a
    `budget.exhausted` announcement is made once per period.
    """

    period: str
    since: float
    limit: int
    route: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One line of a job's history, as `GET /jobs/{id}` shows it."""

    job_id: str
    from_state: JobState | None
    to_state: JobState
    at: float
    note: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An outgoing event for one notify target, written with the job's terminal state."""

    id: int
    job_id: str
    target: str
    event_type: str
    payload: bytes
    attempts: int = 0
    next_attempt_at: float = 0.0
    status: str = "pending"
    last_error: str | None = None
    export_name: str = ""
    """The job's round this announces: its export name, which an operator's retry renews."""


@dataclass(frozen=True, slots=True)
class NewOutboxMessage:
    """An outbox row to insert in the same transaction as a terminal transition.

    `export_name` names the round: each retry of a job announces its own outcome once, and a
    replay within one round cannot announce twice. The store refuses a row of another round.
    """

    target: str
    event_type: str
    payload: bytes = field(repr=False)
    export_name: str


def job_id_for(source: str, dedupe_key: str, route: str) -> str:
    """Derive the job id from its idempotency key, so a redelivery maps to the same job."""
    digest = hashlib.sha256(f"{source}\x00{dedupe_key}\x00{route}".encode()).hexdigest()
    return f"job_{digest[:24]}"


# --- what the operator console reads ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announcement:
    """An outbox row as an operator inspects it: the message, when it was written, delivered."""

    message: OutboxMessage
    created_at: float
    delivered_at: float | None = None


@dataclass(frozen=True, slots=True)
class MinuteActivity:
    """Events received and videos made ready in one wall-clock minute (`minute` is its start)."""

    minute: float
    events: int = 0
    videos: int = 0
