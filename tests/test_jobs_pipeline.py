"""The job loops end to end: real SQLite store, real simulator over loopback, real pipeline."""

import time

import anyio
import pytest

from service.aistudios.simulator import SimulatorKnobs
from service.jobs.ownership import OwnedJobs
from service.jobs.ratelimit import RenderSlots
from service.jobs.reconcile import LEGACY_UNKNOWN
from service.model import API_V3_ONE_STEP, JobState, JobUpdate
from service.store.base import FencedError
from tests.support.aistudios_fixtures import v3_body
from tests.support.jobs_fixtures import jobs_harness, legacy_body

pytestmark = pytest.mark.anyio

S = JobState


async def states_of(store, job_id):
    return [t.to_state for t in await store.job_history(job_id)]


async def test_happy_path_reaches_ready_with_its_outbox_row(tmp_path):
    async with jobs_harness(tmp_path) as h:
        job = await h.add_job("happy")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.download_url
        assert ready.attempts == 1
        assert 1 <= ready.polls <= 6
        assert ready.ready_at >= ready.submitted_at
        assert await states_of(h.store, job.job_id) == [
            S.RECEIVED,
            S.MAPPED,
            S.SUBMITTING,
            S.SUBMITTED,
            S.READY,
        ]
        [row] = await h.outbox(job.job_id)
        assert row["type"] == "video.ready"
        assert row["download_url"] == ready.download_url
        assert h.simulator.export_count == 1
        assert [p.id for p in h.simulator.exports_named(job.export_name)] == [ready.project_id]
        assert h.pipeline.slots.in_flight == 0


async def test_429_storm_pauses_every_request_for_retry_after_and_still_succeeds(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.2, throttle_next=3, retry_after_s=0.3)
    async with jobs_harness(tmp_path, knobs=knobs, max_requests_per_second=20.0) as h:
        first = await h.add_job("storm-1")
        second = await h.add_job("storm-2")
        for job in (first, second):
            done = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
            assert done.state is S.READY
        times = sorted(at for at, _, _ in h.simulator.requests)
        throttled = times[:3]  # the simulator throttles the first three requests it sees
        for at in throttled:
            inside = [t for t in times if at < t < at + 0.3]
            assert not inside, f"request {inside[0] - at:.3f}s after a 429 with Retry-After 0.3"
        assert h.simulator.export_count == 2


async def test_5xx_on_a_one_step_create_is_reconciled_and_adopted_without_a_second_export(
    tmp_path,
):
    knobs = SimulatorKnobs(render_seconds=0.3, fail_5xx_next=1)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        job = await h.add_job("five-hundred", api=API_V3_ONE_STEP)
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert S.RECONCILE in await states_of(h.store, job.job_id)
        assert h.simulator.export_count == 1
        [project] = h.simulator.exports_named(job.export_name)
        assert ready.project_id == project.id


async def test_a_5xx_on_the_draft_bills_nothing_and_the_draft_is_made_again(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.3, fail_5xx_next=1)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        job = await h.add_job("draft-500")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert S.RECONCILE not in await states_of(h.store, job.job_id)
        assert h.simulator.export_count == 1
        drafts = [p for p in h.simulator.projects.values() if p.name == job.export_name]
        assert len(drafts) == 2  # the one whose answer was a 500, and the one exported
        assert h.simulator.billed_exports(ready.project_id) == 1


async def test_two_step_flow_drafts_commits_the_id_then_exports_that_project(tmp_path):
    async with jobs_harness(tmp_path) as h:
        job = await h.add_job("two-step")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        paths = [(m, p) for _, m, p in h.simulator.requests if not p.startswith("/_")]
        assert paths[:2] == [
            ("POST", "/api/odin/v3/editor/project"),
            ("POST", "/api/odin/v3/editor/project/export"),
        ]
        assert h.simulator.billed_exports(ready.project_id) == 1
        assert h.simulator.export_count == 1


async def test_lost_draft_response_bills_nothing_and_exports_once(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.3, lose_response_next_drafts=1)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        job = await h.add_job("lost-draft")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert S.RECONCILE not in await states_of(h.store, job.job_id)
        assert h.simulator.export_count == 1
        assert h.simulator.billed_by_name() == {job.export_name: 1}


async def test_lost_export_response_is_settled_by_reading_the_project_in_seconds(tmp_path):
    # The reconcile wait for the name lookup is long; the two-step flow never needs it.
    knobs = SimulatorKnobs(render_seconds=0.3, lose_response_next_exports=1)
    async with jobs_harness(tmp_path, knobs=knobs, reconcile_wait_s=600.0) as h:
        job = await h.add_job("lost-export")
        started = time.monotonic()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert time.monotonic() - started < 5.0
        assert S.RECONCILE in await states_of(h.store, job.job_id)
        assert h.simulator.export_count == 1
        assert h.simulator.billed_exports(ready.project_id) == 1


async def test_lost_response_after_creation_leaves_exactly_one_export(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.3, lose_response_next_exports=1)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        job = await h.add_job("lost", api=API_V3_ONE_STEP)
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.attempts == 1
        assert len(h.simulator.exports_named(job.export_name)) == 1
        assert h.simulator.export_count == 1


async def test_lost_export_listed_only_once_finished_is_adopted_not_paid_twice(tmp_path):
    # The project list may show only finished exports: the lost project stays invisible for
    # the whole render, which is longer than a naive reconcile wait would be.
    knobs = SimulatorKnobs(
        render_seconds=1.2, lose_response_next_exports=1, list_only_exported=True
    )
    async with jobs_harness(
        tmp_path, knobs=knobs, reconcile_wait_s=30.0, poll_max_interval_s=0.2
    ) as h:
        job = await h.add_job("lost-until-exported", api=API_V3_ONE_STEP)
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        history = [(t.to_state, t.note) for t in await h.store.job_history(job.job_id)]
        assert ready.state is S.READY, history
        assert h.simulator.export_count == 1
        history = [t.note or "" for t in await h.store.job_history(job.job_id)]
        assert any("adopted project" in note for note in history)


async def test_permanent_error_fails_the_job_with_the_api_message(tmp_path):
    async with jobs_harness(tmp_path) as h:
        job = await h.add_job("bad-body", body={"scenes": []})
        failed = await h.store.wait_for(job.job_id, {S.FAILED, S.READY})
        assert failed.state is S.FAILED
        assert failed.error_code == "permanent"
        assert "scenes is required" in failed.error_message
        [row] = await h.outbox(job.job_id)
        assert row["type"] == "video.failed"
        assert "scenes is required" in row["error"]
        assert h.simulator.export_count == 0
        assert h.pipeline.slots.in_flight == 0


async def test_a_stalling_render_fails_as_stalled(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.2, failing_renders_next=1, stall_at=40.0)
    async with jobs_harness(tmp_path, knobs=knobs, stall_seconds=0.4) as h:
        job = await h.add_job("stall")
        failed = await h.store.wait_for(job.job_id, {S.FAILED, S.READY})
        assert failed.state is S.FAILED
        assert failed.error_code == "stalled"
        assert failed.progress == 40.0
        [row] = await h.outbox(job.job_id)
        assert row["type"] == "video.failed"


async def test_a_render_past_its_deadline_fails(tmp_path):
    knobs = SimulatorKnobs(render_seconds=30.0)
    async with jobs_harness(tmp_path, knobs=knobs, render_deadline_seconds=0.5) as h:
        job = await h.add_job("slow")
        failed = await h.store.wait_for(job.job_id, {S.FAILED, S.READY})
        assert failed.state is S.FAILED
        assert failed.error_code == "deadline"
        assert 0 < failed.progress < 100
        assert time.time() - failed.submitted_at < 3.0  # noticed at the deadline, not later


async def test_never_more_renders_in_flight_than_the_limit(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.25)
    async with jobs_harness(tmp_path, knobs=knobs, max_concurrent_exports=2) as h:
        jobs = [await h.add_job(f"many-{i}") for i in range(5)]
        for job in jobs:
            done = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
            assert done.state is S.READY
        # Simulator side: every render interval [created, created + render_seconds].
        edges = []
        for project in h.simulator.projects.values():
            if project.rendering:
                edges += [
                    (project.created_at, 1),
                    (project.created_at + project.render_seconds, -1),
                ]
        running = peak = 0
        for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
            running += delta
            peak = max(peak, running)
        assert h.simulator.export_count == 5
        assert peak == 2


async def test_recovery_of_a_crash_before_the_post_exports_exactly_once(tmp_path):
    async with jobs_harness(tmp_path, start=False) as h:
        job = await h.add_job("crash-before", notify=False)
        await h.prepare(job)
        await h.store.transition(
            job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1)
        )  # the crash: committed, never posted
        await h.start()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        history = await states_of(h.store, job.job_id)
        assert history[3:] == [S.RECONCILE, S.MAPPED, S.SUBMITTING, S.SUBMITTED, S.READY]
        assert h.simulator.export_count == 1


async def test_recovery_of_a_crash_after_the_post_adopts_the_export(tmp_path):
    async with jobs_harness(tmp_path, start=False) as h:
        job = await h.add_job("crash-after", notify=False)
        await h.prepare(job)
        await h.store.transition(job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1))
        # The POST happened, then the process died before recording it.
        await h.store.update_job(job.job_id, JobUpdate(api=API_V3_ONE_STEP))
        project_id = await h.client.export_v3(v3_body(), name=job.export_name)
        await h.start()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.project_id == project_id
        assert h.simulator.export_count == 1


async def test_two_step_crash_after_the_draft_commit_exports_that_draft_once(tmp_path):
    async with jobs_harness(tmp_path, start=False) as h:
        job = await h.add_job("crash-drafted", notify=False)
        await h.prepare(job)
        draft_id = await h.client.create_draft_v3(v3_body(), name=job.export_name)
        await h.store.update_job(job.job_id, JobUpdate(project_id=draft_id))  # then the kill
        await h.start()
        h.pipeline.notify_new_jobs()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.project_id == draft_id
        assert h.simulator.export_count == 1


async def test_two_step_crash_after_the_export_commit_exports_again_after_the_settle_time(
    tmp_path,
):
    async with jobs_harness(tmp_path, start=False) as h:
        job = await h.add_job("crash-committed", notify=False)
        await h.prepare(job)
        draft_id = await h.client.create_draft_v3(v3_body(), name=job.export_name)
        await h.store.update_job(job.job_id, JobUpdate(project_id=draft_id))
        await h.store.transition(job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1))
        await h.start()  # the kill came before the POST left: the project is still a draft
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        history = await states_of(h.store, job.job_id)
        assert history[3:] == [S.RECONCILE, S.MAPPED, S.SUBMITTING, S.SUBMITTED, S.READY]
        assert ready.project_id == draft_id
        assert h.simulator.billed_exports(draft_id) == 1


async def test_two_step_crash_during_the_export_adopts_it_without_waiting(tmp_path):
    async with jobs_harness(tmp_path, start=False, export_settle_s=60.0) as h:
        job = await h.add_job("crash-during", notify=False)
        await h.prepare(job)
        draft_id = await h.client.create_draft_v3(v3_body(), name=job.export_name)
        await h.store.update_job(job.job_id, JobUpdate(project_id=draft_id))
        await h.store.transition(job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1))
        await h.client.export_project_v3(draft_id)  # sent; the process died before recording
        started = time.monotonic()
        await h.start()
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert time.monotonic() - started < 5.0  # adopted at the first read, not after 60 s
        assert h.simulator.billed_exports(draft_id) == 1
        assert h.simulator.export_count == 1


async def test_a_job_a_live_worker_holds_is_left_to_it_and_taken_over_when_its_lease_ends(
    tmp_path,
):
    async with jobs_harness(tmp_path, start=False, owner_id="w-new", lease_s=0.6) as h:
        job = await h.add_job("held", notify=False)
        await h.prepare(job)
        ghost = OwnedJobs(h.store.inner, RenderSlots(4), owner="w-gone", lease_s=0.6)
        claimed = await ghost.claim(job.job_id, {S.MAPPED})
        draft_id = await h.client.create_draft_v3(v3_body(), name=job.export_name)
        await ghost.update_job(job.job_id, JobUpdate(project_id=draft_id))
        await ghost.transition(job.job_id, {S.MAPPED}, S.SUBMITTING, JobUpdate(attempts=1))
        await h.client.export_project_v3(draft_id)
        submitted = JobUpdate(project_id=draft_id, submitted_at=time.time())
        await ghost.transition(job.job_id, {S.SUBMITTING}, S.SUBMITTED, submitted)
        await h.start()  # the ghost's lease still holds: recovery leaves the job alone
        assert h.pipeline.tracker.tracked == 0
        assert (await h.store.get_job(job.job_id)).owner == "w-gone"
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert (ready.owner, ready.fence) == ("w-new", claimed.fence + 1)
        with pytest.raises(FencedError):  # the old claimant wakes up: refused
            await ghost.transition(job.job_id, {S.READY}, S.NOTIFIED)
        with pytest.raises(FencedError):  # and stays refused: its next move is fenced too
            await ghost.update_job(job.job_id, JobUpdate(polls=99))
        assert h.simulator.billed_exports(draft_id) == 1
        assert h.pipeline.slots.in_flight == 0


async def test_an_ambiguous_legacy_export_fails_instead_of_paying_twice(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.2, lose_response_next_exports=1)
    async with jobs_harness(tmp_path, knobs=knobs) as h:
        job = await h.add_job("legacy-lost", body=legacy_body(), api="legacy")
        failed = await h.store.wait_for(job.job_id, {S.FAILED, S.READY})
        assert failed.state is S.FAILED
        assert failed.error_message == LEGACY_UNKNOWN
        assert h.simulator.export_count == 1


async def test_a_legacy_export_is_tracked_to_ready(tmp_path):
    async with jobs_harness(tmp_path) as h:
        job = await h.add_job("legacy-ok", body=legacy_body(), api="legacy")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.download_url


async def test_a_callback_brings_the_confirming_poll_forward(tmp_path):
    knobs = SimulatorKnobs(render_seconds=0.3)
    # Without the callback the first poll would come 5 s after submit (first guess, ceiling 10).
    async with jobs_harness(tmp_path, knobs=knobs, callbacks=True, poll_max_interval_s=10.0) as h:
        job = await h.add_job("callback")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.polls == 1
        assert ready.ready_at - ready.submitted_at < 2.0
        assert [status for _, _, status in h.simulator.callbacks] == [204]
        assert not await h.pipeline.on_callback(job.job_id, "wrong-token")
        assert not await h.pipeline.on_callback("job_unknown", "whatever")


async def test_the_pipeline_tells_its_ready_hook_when_the_callback_came(tmp_path):
    heard = []
    async with jobs_harness(
        tmp_path,
        callbacks=True,
        poll_max_interval_s=10.0,
        on_ready=lambda *args: heard.append(args),
    ) as h:
        job = await h.add_job("ready-hook")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        [(committed, first_callback_at)] = heard
        assert committed == ready
        assert ready.submitted_at < first_callback_at <= ready.ready_at


async def test_a_callback_right_after_a_poll_is_not_held_back_by_the_poll_floor(tmp_path):
    knobs = SimulatorKnobs(render_seconds=2.0)
    # First poll at 1.5 s (75 %); the 1.5 s floor would hold the next one until 3.0 s, but the
    # render finishes at 2.0 s and its callback must be confirmed right away.
    async with jobs_harness(
        tmp_path,
        knobs=knobs,
        callbacks=True,
        first_poll_s=1.5,
        poll_min_interval_s=1.5,
        poll_max_interval_s=10.0,
    ) as h:
        job = await h.add_job("callback-after-poll")
        ready = await h.store.wait_for(job.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY
        assert ready.polls == 2
        assert ready.ready_at - ready.submitted_at < 2.7


async def test_a_crashing_mapping_rejects_only_its_job(tmp_path):
    async with jobs_harness(tmp_path) as h:
        good = await h.add_job("good", notify=False)
        bad = await h.add_job("bad", notify=False)
        del h.bodies[bad.job_id]  # prepare() raises KeyError for this one
        h.pipeline.notify_new_jobs()
        rejected = await h.store.wait_for(bad.job_id, {S.REJECTED, S.MAPPED})
        assert rejected.state is S.REJECTED
        assert "KeyError" in rejected.error_message
        ready = await h.store.wait_for(good.job_id, {S.READY, S.FAILED})
        assert ready.state is S.READY


async def test_a_bug_in_a_loop_fails_the_pipeline(tmp_path):
    async with jobs_harness(tmp_path, start=False) as h:
        real = h.store.inner.jobs_in_states

        async def broken_for_received(states, limit=1000):
            if S.RECEIVED in states:
                raise RuntimeError("bug in the loop")
            return await real(states, limit)

        h.store.inner.jobs_in_states = broken_for_received
        with pytest.raises(ExceptionGroup) as info, anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(h.pipeline.run)
        assert info.group_contains(RuntimeError, match="bug in the loop", depth=None)


async def test_the_first_poll_comes_when_the_template_s_renders_finish_even_after_a_restart(
    tmp_path,
):
    knobs = SimulatorKnobs(render_seconds=0.3)
    timing = {"first_poll_s": 2.0, "poll_max_interval_s": 10.0}
    async with jobs_harness(tmp_path, knobs=knobs, **timing) as h:
        first = await h.add_job("learn-1")
        done = await h.store.wait_for(first.job_id, {S.READY, S.FAILED})
        assert done.ready_at - done.submitted_at >= 2.0  # nothing learned: the fixed guess
        estimate = h.pipeline.tracker.estimate_s(first.route)
        assert 0.2 <= estimate <= 2.0
        assert (await h.store.render_estimates())[first.route] == estimate
    # A new process on the same store file starts from what was learned.
    async with jobs_harness(tmp_path, knobs=knobs, **timing) as h:
        second = await h.add_job("learn-2")
        done = await h.store.wait_for(second.job_id, {S.READY, S.FAILED})
        assert done.state is S.READY
        assert done.ready_at - done.submitted_at < 1.8


async def test_received_jobs_are_mapped_in_shared_transactions(tmp_path):
    async with jobs_harness(tmp_path, start=False) as h:
        jobs = [await h.add_job(f"flood-{i}", notify=False) for i in range(200)]
        commits_before = h.store.inner.commit_count
        deferred = await h.pipeline._prepare_batch(jobs)  # one round of the mapping loop
        commits = h.store.inner.commit_count - commits_before
        assert not deferred
        for job in jobs:
            assert (await h.store.get_job(job.job_id)).state is S.MAPPED
        assert commits <= len(jobs) / 4, f"{commits} transactions for {len(jobs)} jobs"
