"""Groups of job states the loops and the admin API act on.

The allowed moves themselves are `service.model.ALLOWED_TRANSITIONS`, which the store
enforces on every transition; these sets say which of those states matter to whom.
"""

from __future__ import annotations

from service.model import JobState

_S = JobState

IN_FLIGHT: frozenset[JobState] = frozenset({_S.SUBMITTING, _S.SUBMITTED, _S.RECONCILE})
"""States in which a job holds one of the `max_concurrent_exports` render slots."""

ADMIN_RETRYABLE: frozenset[JobState] = frozenset({_S.FAILED, _S.REJECTED})
"""States an operator may send back into the pipeline."""
