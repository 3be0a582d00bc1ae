"""What the submitter, reconciler and tracker share, and the steps they all take with it.

The three loops move the same jobs through one store (under this worker's claims), spend one
render budget, call one API through one request gate, and read one clock. One frozen context
makes "the same ones" a fact of construction, and the failure commit every loop performs
lives here once. `DueHeap` is the timer
heap the reconciler and tracker both schedule on.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from service.log import get_logger
from service.model import Job, JobState, JobUpdate, NewOutboxMessage
from service.store.base import StaleTransitionError

if TYPE_CHECKING:
    from collections.abc import Collection

    from service.backoff import RandomSource
    from service.jobs.ports import Clock, JobStore, Sleep
    from service.jobs.ratelimit import RenderSlots, RequestGate

log = get_logger("jobs")

OutboxFor = Callable[[Job, str], Sequence[NewOutboxMessage]]
"""The caller's notify targets: the outbox rows committed with a terminal state."""

ApiT_co = TypeVar("ApiT_co", covariant=True)


async def end_with_error(
    store: JobStore,
    outbox_for: OutboxFor,
    job: Job,
    from_states: Collection[JobState],
    to_state: JobState,
    *,
    code: str,
    message: str,
    now: float,
) -> Job | None:
    """End a job as `failed` or `rejected` with its reason and its `video.failed` rows.

    One transaction, so the announcement exists exactly when the verdict does; None when
    another path moved the job first.
    """
    ended = dataclasses.replace(
        job, state=to_state, error_code=code, error_message=message, updated_at=now
    )
    update = JobUpdate(error_code=code, error_message=message, note=message)
    try:
        moved = await store.transition(
            job.job_id, from_states, to_state, update, outbox_for(ended, "video.failed")
        )
    except StaleTransitionError:
        log.info("job.end_raced", code=code, state=to_state.value)
        return None
    event = "job.failed" if to_state is JobState.FAILED else "job.rejected"
    log.warning(event, code=code, reason=message)
    return moved


@dataclass(frozen=True)
class JobLoopContext(Generic[ApiT_co]):
    """The collaborators every job loop shares; `api` is typed as the part a loop calls.

    One instance serves all three loops, so they share one set of claims (`store` is this
    worker's `OwnedJobs`), one render budget and one request gate.
    """

    store: JobStore
    api: ApiT_co
    slots: RenderSlots
    gate: RequestGate
    outbox_for: OutboxFor
    clock: Clock
    sleep: Sleep
    rng: RandomSource

    async def fail(
        self, job: Job, from_states: Collection[JobState], *, code: str, message: str
    ) -> Job | None:
        """Move a job to `failed` with its `video.failed` rows; None when another path moved it."""
        return await end_with_error(
            self.store,
            self.outbox_for,
            job,
            from_states,
            JobState.FAILED,
            code=code,
            message=message,
            now=self.clock(),
        )


class DueHeap:
    """Keyed timers on one heap; each push gets a sequence number that supersedes older ones.

    Rescheduling pushes again instead of re-sorting: a loop drops a popped entry whose number
    is no longer the key's latest.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def push(self, key: str, due_at: float) -> int:
        """Schedule `key` at `due_at`; returns the entry's number."""
        seq = next(self._seq)
        heapq.heappush(self._heap, (due_at, seq, key))
        return seq

    def pop_due(self, now: float) -> tuple[int, str] | None:
        """The earliest entry due by `now` as (number, key), or None."""
        if not self._heap or self._heap[0][0] > now:
            return None
        _, seq, key = heapq.heappop(self._heap)
        return seq, key

    def next_due(self) -> float:
        """When the earliest entry falls due; infinity when there is none."""
        return self._heap[0][0] if self._heap else math.inf
