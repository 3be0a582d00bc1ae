"""Groups of job states the loops and the admin API act on.

The allowed moves themselves are `service.model.ALLOWED_TRANSITIONS`, which the store
enforces on every transition; these sets say which of those states matter to whom.
"""

from __future__ import annotations

from service.model import JobState

_S = JobState

IN_FLIGHT: frozenset[JobState] = frozenset({_S.SUBMITTING, _S.SUBMITTED, _S.RECONCILE})
"""States of a job whose paid call was committed and that is not finished: recovery and
take-over claim these."""

RENDERING: frozenset[JobState] = frozenset({_S.SUBMITTING, _S.SUBMITTED})
"""States in which a job holds one of the `max_concurrent_exports` render slots. `reconcile`
is not one: an uncertain export holds a slot only once the API shows it (it is then adopted
as `submitted`), so uncertain jobs never starve the others."""

ADMIN_RETRYABLE: frozenset[JobState] = frozenset({_S.FAILED, _S.REJECTED})
"""States an operator may send back into the pipeline."""
