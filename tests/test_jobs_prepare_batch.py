"""The pipeline with a batch mapper: many received jobs per call, one commit, bugs isolated."""

import orjson
import pytest

from service.model import JobState, JobUpdate
from tests.support.jobs_fixtures import jobs_harness

pytestmark = pytest.mark.anyio


class BatchMapper:
    """Maps a batch with one `map_jobs` commit; can be told to crash on a batch once."""

    def __init__(self, harness, *, crash_first_batch: bool = False) -> None:
        self.harness = harness
        self.crash_next = crash_first_batch
        self.batches: list[int] = []
        self.singles = 0

    async def prepare_many(self, jobs):
        if self.crash_next and len(jobs) > 1:
            self.crash_next = False
            raise RuntimeError("a bug outside any one job")
        if len(jobs) == 1:
            self.singles += 1
        self.batches.append(len(jobs))
        mapped = []
        for job in jobs:
            api, body = self.harness.bodies[job.job_id]
            mapped.append((job.job_id, JobUpdate(export_body=orjson.dumps(body), api=api)))
        await self.harness.store.map_jobs(mapped)


async def add_then_start(harness, count):
    jobs = [await harness.add_job(f"batch-{n}", notify=False) for n in range(count)]
    await harness.start()
    for job in jobs:
        done = await harness.store.wait_for(job.job_id, {JobState.READY, JobState.FAILED})
        assert done.state is JobState.READY
    return jobs


async def test_received_jobs_are_mapped_in_one_batch_and_all_reach_ready(tmp_path):
    mappers = []

    def build(harness):
        mappers.append(BatchMapper(harness))
        return mappers[0]

    async with jobs_harness(tmp_path, start=False, prepare_for=build) as h:
        await add_then_start(h, 6)
        assert mappers[0].batches == [6]
        assert h.simulator.export_count == 6


async def test_a_batch_that_crashes_is_mapped_again_one_job_at_a_time(tmp_path):
    mappers = []

    def build(harness):
        mappers.append(BatchMapper(harness, crash_first_batch=True))
        return mappers[0]

    async with jobs_harness(tmp_path, start=False, prepare_for=build) as h:
        await add_then_start(h, 3)
        assert mappers[0].singles == 3
        assert h.simulator.export_count == 3
