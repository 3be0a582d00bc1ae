"""An operator's retry: a fresh retry budget and a fresh, stored export name."""

import dataclasses

import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.jobs.retry import mapped_export_name, retry_export_name, retry_update
from service.jobs.states import ADMIN_RETRYABLE
from service.model import Job, JobState
from tests.support.jobs_fixtures import jobs_harness

S = JobState


def failed_job(**changes):
    job = Job(
        job_id="job_1",
        event_row=1,
        source="shop",
        route="welcome",
        state=S.FAILED,
        export_name="Welcome #job_1",
        created_at=1.0,
        updated_at=2.0,
        attempts=5,
        error_code="retries_exhausted",
    )
    return dataclasses.replace(job, **changes)


def test_a_retry_resets_the_attempt_counter():
    assert retry_update(failed_job(), now=10.0).attempts == 0


def test_the_retry_name_carries_the_retry_time_not_the_attempt_count():
    assert retry_export_name(failed_job(), 1_700_000_000.1234) == "Welcome #job_1/r1700000000123"
    assert retry_export_name(failed_job(attempts=0), 5.0) == "Welcome #job_1/r5000"


def test_a_second_retry_replaces_the_suffix_of_the_first():
    first = retry_update(failed_job(), now=100.0).export_name
    second = retry_export_name(failed_job(export_name=first), 200.0)
    assert (first, second) == ("Welcome #job_1/r100000", "Welcome #job_1/r200000")


def test_mapping_renders_the_name_only_for_a_job_the_intake_left_unnamed():
    def render():
        return "Lamp #job_1"

    assert mapped_export_name("", render) == "Lamp #job_1"
    assert mapped_export_name("Welcome #job_1", render) == "Welcome #job_1"
    assert mapped_export_name("Welcome #job_1/r5000", render) == "Welcome #job_1/r5000"


def test_a_retry_of_a_job_never_named_keeps_its_round_after_the_rendered_name():
    unnamed = failed_job(export_name="", state=S.REJECTED)
    retried = retry_update(unnamed, now=5.0).export_name
    assert mapped_export_name(retried, lambda: "Lamp #job_1") == "Lamp #job_1/r5000"


def test_the_same_retry_time_gives_the_same_name():
    assert retry_update(failed_job(), now=7.5) == retry_update(failed_job(), now=7.5)


@pytest.mark.anyio
async def test_a_job_that_exhausted_its_retries_gets_a_new_budget_when_retried(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.2, throttle_next=2, retry_after_s=0.05)
    async with jobs_harness(tmp_path, knobs=knobs, max_retries=2) as h:
        job = await h.add_job("exhausted")
        failed = await h.store.wait_for(job.job_id, {S.FAILED, S.READY})
        assert (failed.error_code, failed.attempts) == ("retries_exhausted", 2)

        h.simulator.knobs.throttle_next = 1  # the retried run meets one 429 too
        retried = await h.store.transition(
            job.job_id, ADMIN_RETRYABLE, S.RECEIVED, retry_update(failed)
        )
        h.pipeline.notify_new_jobs()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})

        assert ready.state is S.READY, ready.error_message
        assert ready.attempts == 2
        assert ready.export_name == retried.export_name != job.export_name
        assert [p.id for p in h.simulator.exports_named(ready.export_name)] == [ready.project_id]
