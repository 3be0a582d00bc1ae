"""The engine-neutral part of job writes: which columns an update sets, how a batch is grouped.

Both engines run the same statements with their own parameter mark (`?` for SQLite, `%s` for
psycopg), so the planning is done once here and each engine only executes the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from service.model import Job, JobState, JobUpdate

UPDATE_COLUMNS = tuple(
    f.name for f in dataclasses.fields(JobUpdate) if f.name not in {"note", "clear"}
)
"""The job columns an update can set (every `JobUpdate` field but the note and `clear`)."""
CLEARABLE_COLUMNS = frozenset(f.name for f in dataclasses.fields(Job) if f.default is None)
"""The job columns an update may set back to NULL."""


def job_changes(update: JobUpdate) -> list[tuple[str, object]]:
    """Column assignments of an update: given values, then `clear`ed fields set to NULL."""
    given = [
        (name, value) for name in UPDATE_COLUMNS if (value := getattr(update, name)) is not None
    ]
    unknown = update.clear - CLEARABLE_COLUMNS
    if unknown:
        raise ValueError(f"cannot clear {', '.join(sorted(unknown))}: not a nullable job field")
    both = update.clear & {name for name, _ in given}
    if both:
        raise ValueError(f"{', '.join(sorted(both))} both set and cleared in one update")
    return given + [(name, None) for name in sorted(update.clear)]


@dataclass
class MappingPlan:
    """A batch of `received -> mapped` moves: one UPDATE per shape of assignments."""

    updates: dict[str, list[tuple[object, ...]]] = field(default_factory=dict)
    """`SET` clause -> the parameter rows of the jobs updated with it (job id last)."""
    history: list[tuple[object, ...]] = field(default_factory=list)
    """One transitions row per moved job."""
    moved: list[str] = field(default_factory=list)


def plan_mapping(
    mapped: Sequence[tuple[str, JobUpdate]], still_received: Collection[str], now: float, mark: str
) -> MappingPlan:
    """The moves of the `mapped` jobs still `received`; a job listed twice moves once."""
    waiting = set(still_received)
    plan = MappingPlan()
    for job_id, update in mapped:
        if job_id not in waiting:
            continue
        waiting.discard(job_id)
        changes = [("updated_at", now), ("state", JobState.MAPPED.value), *job_changes(update)]
        assignments = ", ".join(f"{name} = {mark}" for name, _ in changes)
        plan.updates.setdefault(assignments, []).append((*(value for _, value in changes), job_id))
        plan.history.append(
            (job_id, JobState.RECEIVED.value, JobState.MAPPED.value, now, update.note)
        )
        plan.moved.append(job_id)
    return plan
