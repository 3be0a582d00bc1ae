"""The job state machine as data: which moves are allowed and what a restart does with each state.

Kept as tables so the store, the loops, the admin API and the tests all read the same rules. The
money rule lives here too: the only way out of `submitting` back to `mapped` is a create that
certainly made nothing; anything uncertain goes through `reconcile`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from service.model import JobState

if TYPE_CHECKING:
    from collections.abc import Mapping

_S = JobState

ALLOWED: Mapping[JobState, frozenset[JobState]] = {
    _S.RECEIVED: frozenset({_S.MAPPED, _S.REJECTED, _S.IGNORED}),
    # mapped -> failed: the stored export body is unusable, so there is nothing to POST.
    _S.MAPPED: frozenset({_S.SUBMITTING, _S.FAILED}),
    # submitting -> mapped only for a retryable error that certainly created nothing.
    _S.SUBMITTING: frozenset({_S.SUBMITTED, _S.RECONCILE, _S.FAILED, _S.MAPPED}),
    # reconcile -> mapped only after the project list showed no such export after the wait.
    _S.RECONCILE: frozenset({_S.SUBMITTED, _S.MAPPED, _S.FAILED}),
    _S.SUBMITTED: frozenset({_S.READY, _S.FAILED}),
    _S.READY: frozenset({_S.NOTIFIED}),
    _S.NOTIFIED: frozenset(),
    _S.IGNORED: frozenset(),
    # Admin retry: a failed export is submitted again; a rejected job is mapped again once the
    # route or template was fixed (or re-queued as it is, when the body was already built).
    _S.FAILED: frozenset({_S.MAPPED, _S.RECEIVED}),
    _S.REJECTED: frozenset({_S.MAPPED, _S.RECEIVED}),
}

IN_FLIGHT: frozenset[JobState] = frozenset({_S.SUBMITTING, _S.SUBMITTED, _S.RECONCILE})
"""States in which a job holds one of the `max_concurrent_exports` render slots."""

ADMIN_RETRYABLE: frozenset[JobState] = frozenset({_S.FAILED, _S.REJECTED})
"""States an operator may send back into the pipeline."""


def can_transition(from_state: JobState, to_state: JobState) -> bool:
    """Whether the state machine allows this move, so callers and tests share one rule."""
    return to_state in ALLOWED[from_state]


def sources_of(to_state: JobState) -> frozenset[JobState]:
    """Every state that may move to `to_state`: the `from_states` of a store compare-and-set."""
    return frozenset(state for state, targets in ALLOWED.items() if to_state in targets)


class Recovery(StrEnum):
    """What a starting process does with a job it finds in a non-terminal state."""

    PREPARE = "prepare"
    """`received`: build the export body (the caller's mapping step)."""
    SUBMIT = "submit"
    """`mapped`: queue for the submitter (honouring `next_attempt_at`)."""
    RECONCILE = "reconcile"
    """`submitting`: the POST may have happened before the crash; move to `reconcile` first."""
    RESUME_RECONCILE = "resume_reconcile"
    """`reconcile`: carry on looking the export up by its name."""
    TRACK = "track"
    """`submitted`: the render is running; poll it."""
    OUTBOX = "outbox"
    """`ready`: the outbox rows were committed with the state; the notifier delivers them."""


RECOVERY: Mapping[JobState, Recovery] = {
    _S.RECEIVED: Recovery.PREPARE,
    _S.MAPPED: Recovery.SUBMIT,
    _S.SUBMITTING: Recovery.RECONCILE,
    _S.RECONCILE: Recovery.RESUME_RECONCILE,
    _S.SUBMITTED: Recovery.TRACK,
    _S.READY: Recovery.OUTBOX,
}
"""Every non-terminal state and its restart action; terminal states need none."""
