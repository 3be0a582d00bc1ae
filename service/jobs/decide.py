"""What to do after a lookup of an uncertain export: pure decisions, tested on a fake clock.

A job reaches `reconcile` when its paid call may or may not have happened (a lost response,
a 5xx, a crash with `submitting` committed). Two ways to find out, one per export flow:

- two-step (v3 default): the export addressed a project that already existed, so reading
  that project (`GET …/editor/project/{id}`) says whether the export started. A project that
  still reads as a plain draft after `settle_s` was never exported and is exported again; a
  project that no longer exists had nothing billed and is drafted again.
- one-step (seed 000's create-and-export): the export is looked up by its name in the
  project list, which may list only finished exports, so only after `wait_s` of not finding
  it is it posted again.

`resume_step` says what a stored job needs next, whatever moment a crash left it at. The loops
carry these decisions out; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.model import API_V3, JobState


class Step(StrEnum):
    """What a job needs next, judged from its committed row alone (after a restart, say)."""

    CREATE_DRAFT = "create_draft"
    EXPORT = "export"
    LOOK_UP = "look_up"
    TRACK = "track"
    NONE = "none"


def resume_step(state: JobState, api: str, project_id: str | None) -> Step:
    """The next step of a job as stored: every crash window maps to exactly one of these.

    Killed before the draft (or while creating it): `mapped` without a project, so the draft
    is created (again: a lost draft bills nothing). Killed after the draft's id was committed:
    `mapped` with the project, so that project is exported. Killed after `submitting` was
    committed, whether or not the POST left: looked up, never posted blind. Killed while it
    rendered: tracked.
    """
    if state is JobState.MAPPED:
        return Step.CREATE_DRAFT if api == API_V3 and project_id is None else Step.EXPORT
    if state in {JobState.SUBMITTING, JobState.RECONCILE}:
        return Step.LOOK_UP
    if state is JobState.SUBMITTED:
        return Step.TRACK
    return Step.NONE


@dataclass(frozen=True, slots=True)
class Adopt:
    """The export exists: track it as `submitted` under this project id."""

    project_id: str


@dataclass(frozen=True, slots=True)
class ExportAgain:
    """Certainly not exported: back to `mapped` to send the paid call again.

    `keep_project` is True when the draft exists and only the export is to be repeated; False
    when the next attempt starts from a new draft (or, one-step, a new create).
    """

    reason: str
    keep_project: bool


@dataclass(frozen=True, slots=True)
class LookAgain:
    """Not known yet: look again at `at` (clock seconds)."""

    at: float


LookupDecision = Adopt | ExportAgain | LookAgain


@dataclass(frozen=True, slots=True)
class ProjectLook:
    """What a read of one project showed: whether it exists and whether its export started."""

    exists: bool
    export_started: bool


def after_project_read(
    look: ProjectLook,
    project_id: str,
    *,
    entered_at: float,
    now: float,
    settle_s: float,
) -> LookupDecision:
    """Two-step flow: settle an uncertain export of `project_id` by what reading it showed.

    Any sign of an export (credit taken, a backend task, progress, a download URL) adopts it
    at once. A plain draft is exported again only once `settle_s` has passed since the export
    was sent, so an export the API has not yet recorded is not paid twice; until then it is
    read again every quarter of the settle time.
    """
    if look.exists and look.export_started:
        return Adopt(project_id)
    settled_at = entered_at + settle_s
    if now < settled_at:
        return LookAgain(min(settled_at, now + settle_s / 4))
    if look.exists:
        return ExportAgain(
            f"project {project_id} still a draft {now - entered_at:.1f}s after the export",
            keep_project=True,
        )
    return ExportAgain(
        f"project {project_id} not found {now - entered_at:.1f}s after the export",
        keep_project=False,
    )


def after_name_lookup(
    found_project_id: str | None,
    export_name: str,
    *,
    entered_at: float,
    now: float,
    wait_s: float,
    look_every_s: float,
) -> LookupDecision:
    """One-step flow: adopt the export listed under the job's name, or post again after `wait_s`."""
    if found_project_id is not None:
        return Adopt(found_project_id)
    if now - entered_at >= wait_s:
        return ExportAgain(
            f"no export named {export_name!r} after {now - entered_at:.0f}s", keep_project=False
        )
    return LookAgain(min(entered_at + wait_s, now + look_every_s))
