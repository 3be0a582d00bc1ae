"""The job loops while the store fails: real pipeline, real simulator, a store that says no."""

import anyio
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.jobs import submitter
from service.model import API_V3_ONE_STEP, JobState
from service.store.base import StoreUnavailableError
from tests.support.jobs_fixtures import jobs_harness

pytestmark = pytest.mark.anyio

S = JobState


def failing_transitions(store, from_state, to_state, times):
    """Make the real store refuse `times` commits of one move, as a full disk would."""
    real = store.inner.transition
    failures = {"left": times}

    async def transition(job_id, from_states, target, update=None, outbox=(), *, fence=None):
        if from_state in from_states and target is to_state and failures["left"] > 0:
            failures["left"] -= 1
            raise StoreUnavailableError("disk full")
        return await real(job_id, from_states, target, update, outbox, fence=fence)

    store.inner.transition = transition
    return failures


async def states_of(store, job_id):
    return [t.to_state for t in await store.job_history(job_id)]


async def test_a_failed_commit_after_a_permanent_error_is_retried_not_left_submitting(tmp_path):
    async with jobs_harness(tmp_path) as h:
        failures = failing_transitions(h.store, S.SUBMITTING, S.FAILED, times=1)
        job = await h.add_job("refused-then-store-down", body={"scenes": []}, api=API_V3_ONE_STEP)
        failed = await h.store.wait_for(job.job_id, {S.FAILED}, timeout_s=5.0)
        assert failures["left"] == 0
        assert failed.error_code == "permanent"
        assert h.pipeline.slots.in_flight == 0


async def test_giving_up_on_a_retry_commit_hands_the_job_to_the_reconciler(tmp_path, monkeypatch):
    monkeypatch.setattr(submitter, "_COMMIT_ATTEMPTS", 2)
    knobs = SimulatorKnobs(render_seconds=0.2, throttle_next=1, retry_after_s=0.05)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        failures = failing_transitions(h.store, S.SUBMITTING, S.MAPPED, times=2)
        job = await h.add_job("throttled-then-store-down", api=API_V3_ONE_STEP)
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED}, timeout_s=8.0)
        assert failures["left"] == 0
        assert ready.state is S.READY
        assert await states_of(h.store, job.job_id) == [
            S.RECEIVED,
            S.MAPPED,
            S.SUBMITTING,
            S.RECONCILE,  # the 429's outcome could not be committed: looked up, not found
            S.MAPPED,
            S.SUBMITTING,
            S.SUBMITTED,
            S.READY,
        ]
        assert h.simulator.export_count == 1
        assert h.pipeline.slots.in_flight == 0


async def test_a_job_whose_mapping_met_a_store_outage_is_mapped_again_without_a_wake_up(
    tmp_path,
):
    async with jobs_harness(tmp_path) as h:
        failures = failing_transitions(h.store, S.RECEIVED, S.MAPPED, times=1)
        job = await h.add_job("mapped-during-outage")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED}, timeout_s=5.0)
        assert failures["left"] == 0
        assert ready.state is S.READY
        assert h.simulator.export_count == 1


async def test_failed_queue_reads_are_retried_and_do_not_stop_the_pipeline(tmp_path):
    async with jobs_harness(tmp_path) as h:
        real = h.store.inner.jobs_in_states
        failures = {S.RECEIVED: 2, S.MAPPED: 2}

        async def jobs_in_states(states, limit=1000):
            for state in states:
                if failures.get(state, 0) > 0:
                    failures[state] -= 1
                    raise StoreUnavailableError("database is locked")
            return await real(states, limit)

        h.store.inner.jobs_in_states = jobs_in_states
        job = await h.add_job("queues-unreadable")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED}, timeout_s=8.0)
        assert ready.state is S.READY
        # The job may be taken up by a wake-up before a failed scan is retried: the retries
        # still come (each failing read was retried, none stopped its loop).
        with anyio.fail_after(8.0):
            while any(failures.values()):
                await anyio.sleep(0.01)
        assert failures == {S.RECEIVED: 0, S.MAPPED: 0}
