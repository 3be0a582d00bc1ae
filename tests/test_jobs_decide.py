"""The lookup decisions of `reconcile`, one per crash window, on a fake clock (no I/O)."""

import pytest

from service.jobs.decide import (
    Adopt,
    ExportAgain,
    LookAgain,
    ProjectLook,
    Step,
    after_name_lookup,
    after_project_read,
    resume_step,
)
from service.model import API_V3, API_V3_ONE_STEP, JobState

ENTERED = 1000.0
DRAFT = ProjectLook(exists=True, export_started=False)
EXPORTING = ProjectLook(exists=True, export_started=True)
GONE = ProjectLook(exists=False, export_started=False)


def read(look, now, settle_s=5.0):
    return after_project_read(look, "p1", entered_at=ENTERED, now=now, settle_s=settle_s)


def test_kill_during_the_export_adopts_it_at_the_first_read():
    # The POST reached the API before the kill: any sign of the export adopts it at once.
    assert read(EXPORTING, ENTERED + 0.01) == Adopt("p1")
    assert read(EXPORTING, ENTERED + 999) == Adopt("p1")


def test_kill_after_the_export_commit_exports_the_draft_again_only_once_settled():
    # `submitting` committed, the POST never left: the project stays a plain draft.
    early = read(DRAFT, ENTERED + 1.0)
    assert isinstance(early, LookAgain)
    assert ENTERED + 1.0 < early.at <= ENTERED + 5.0
    settled = read(DRAFT, ENTERED + 5.0)
    assert isinstance(settled, ExportAgain)
    assert settled.keep_project is True


def test_an_export_recorded_late_is_still_adopted_within_the_settle_time():
    assert isinstance(read(DRAFT, ENTERED + 4.9), LookAgain)
    assert read(EXPORTING, ENTERED + 4.95) == Adopt("p1")


def test_looks_again_often_but_never_past_the_settle_moment():
    at = ENTERED
    looks = []
    while isinstance(decision := read(DRAFT, at), LookAgain):
        looks.append(decision.at)
        at = decision.at
    assert looks[-1] == pytest.approx(ENTERED + 5.0)
    assert len(looks) <= 5


def test_a_vanished_project_starts_again_from_a_new_draft_after_settling():
    assert isinstance(read(GONE, ENTERED + 1.0), LookAgain)
    decision = read(GONE, ENTERED + 6.0)
    assert isinstance(decision, ExportAgain)
    assert decision.keep_project is False


def by_name(found, now, wait_s=1800.0, look_every_s=60.0):
    return after_name_lookup(
        found, "sh-x", entered_at=ENTERED, now=now, wait_s=wait_s, look_every_s=look_every_s
    )


def test_one_step_found_by_name_is_adopted():
    assert by_name("p9", ENTERED + 3) == Adopt("p9")


def test_one_step_missing_waits_the_whole_reconcile_wait_before_posting_again():
    assert by_name(None, ENTERED + 10) == LookAgain(ENTERED + 70)
    assert by_name(None, ENTERED + 1790) == LookAgain(ENTERED + 1800)
    again = by_name(None, ENTERED + 1800)
    assert isinstance(again, ExportAgain)
    assert again.keep_project is False


@pytest.mark.parametrize(
    ("window", "state", "api", "project_id", "step"),
    [
        ("before the draft", JobState.MAPPED, API_V3, None, Step.CREATE_DRAFT),
        ("after the draft commit", JobState.MAPPED, API_V3, "p1", Step.EXPORT),
        ("after the export commit", JobState.SUBMITTING, API_V3, "p1", Step.LOOK_UP),
        ("during the export", JobState.SUBMITTING, API_V3, "p1", Step.LOOK_UP),
        ("while rendering", JobState.SUBMITTED, API_V3, "p1", Step.TRACK),
        ("one-step, before the create", JobState.MAPPED, API_V3_ONE_STEP, None, Step.EXPORT),
        ("one-step, after its commit", JobState.SUBMITTING, API_V3_ONE_STEP, None, Step.LOOK_UP),
        ("uncertain, looked up", JobState.RECONCILE, API_V3, "p1", Step.LOOK_UP),
        ("finished", JobState.READY, API_V3, "p1", Step.NONE),
    ],
)
def test_every_crash_window_resumes_at_the_right_step(window, state, api, project_id, step):
    assert resume_step(state, api, project_id) is step, window


def test_each_window_then_settles_to_exactly_one_export():
    # After the export commit the POST never left: the draft reads plainly a draft, and only
    # after the settle time is it exported again. During the export it left: adopted at once.
    never_sent = [read(DRAFT, ENTERED + t) for t in (0.0, 1.25, 2.5, 3.75)]
    assert all(isinstance(d, LookAgain) for d in never_sent)
    assert read(DRAFT, ENTERED + 5.0) == ExportAgain(
        "project p1 still a draft 5.0s after the export", keep_project=True
    )
    assert read(EXPORTING, ENTERED) == Adopt("p1")
