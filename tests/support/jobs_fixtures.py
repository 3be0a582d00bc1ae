"""Job pipeline fixtures: a real SQLite store, the simulator over loopback, the real loops.

`ObservedStore` is the real store with a change signal, so tests await a job's state instead
of sleeping. `jobs_harness` runs a whole `JobPipeline` against the simulator with fast timing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiohttp import web

from service.aistudios.client import AIStudiosClient
from service.aistudios.simulator import Simulator, SimulatorKnobs
from service.config import AIStudiosConfig
from service.jobs.pipeline import JobPipeline
from service.jobs.ratelimit import RequestGate
from service.jobs.tracker import ReadyHook, ignore_ready
from service.model import Job, JobState, JobUpdate, NewOutboxMessage
from service.store.sqlite import SQLiteStore
from tests.support.aistudios_fixtures import client_for, running_simulator, v3_body
from tests.support.loopback import tiny_server
from tests.support.store_fixtures import sample_event, sample_job

TARGET = "test-target"
FAST = AIStudiosConfig(
    max_concurrent_exports=4,
    max_requests_per_second=50.0,
    render_deadline_seconds=20.0,
    stall_seconds=10.0,
    reconcile_wait_s=0.3,
    export_settle_s=0.3,
    poll_min_interval_s=0.05,
    poll_max_interval_s=0.5,
    max_retries=5,
)


def outbox_for(job: Job, event_type: str) -> list[NewOutboxMessage]:
    """One row per event for a single test target, carrying what a consumer would read."""
    payload = {
        "type": event_type,
        "job_id": job.job_id,
        "state": str(job.state),
        "download_url": job.download_url,
        "error": job.error_message,
    }
    return [
        NewOutboxMessage(
            target=TARGET,
            event_type=event_type,
            payload=orjson.dumps(payload),
            export_name=job.export_name,
        )
    ]


def legacy_body() -> dict[str, Any]:
    """The smallest legacy export body the simulator accepts."""
    return {"scenes": [{"AIModel": {"script": "Hello"}, "clips": []}]}


class ObservedStore:
    """The real SQLite store, plus a signal after every committed change (no polling in tests)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self._changed = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def transition(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        update: JobUpdate | None = None,
        outbox: Sequence[NewOutboxMessage] = (),
        *,
        fence: int | None = None,
    ) -> Job:
        try:
            return await self.inner.transition(
                job_id, from_states, to_state, update, outbox, fence=fence
            )
        finally:
            self._signal()

    async def update_job(self, job_id: str, update: JobUpdate, *, fence: int | None = None) -> Job:
        try:
            return await self.inner.update_job(job_id, update, fence=fence)
        finally:
            self._signal()

    async def spend_or_hold(self, *args: Any, **kwargs: Any) -> Job:
        try:
            return await self.inner.spend_or_hold(*args, **kwargs)
        finally:
            self._signal()

    async def wait_until(self, check: Any, timeout_s: float = 15.0) -> Any:
        """Await `check()` (an async predicate over the store) until it returns a truthy value."""
        with anyio.fail_after(timeout_s):
            while True:
                changed = self._changed
                result = await check()
                if result:
                    return result
                await changed.wait()

    async def wait_for(
        self, job_id: str, states: Collection[JobState], timeout_s: float = 15.0
    ) -> Job:
        """The job once it is in one of `states`."""
        with anyio.fail_after(timeout_s):
            while True:
                changed = self._changed
                job = await self.inner.get_job(job_id)
                if job is not None and job.state in states:
                    return job
                await changed.wait()


@dataclass
class JobsHarness:
    """A running pipeline and everything around it."""

    store: ObservedStore
    simulator: Simulator
    client: AIStudiosClient
    gate: RequestGate
    pipeline: JobPipeline
    bodies: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    task_group: anyio.abc.TaskGroup | None = None

    async def start(self) -> None:
        """Start the pipeline (recovery first), as a restarted process would."""
        assert self.task_group is not None
        await self.task_group.start(self.pipeline.run)

    async def add_job(
        self, key: str, body: dict[str, Any] | None = None, api: str = "v3", *, notify: bool = True
    ) -> Job:
        """Commit an event with one job (`received`); the harness's prepare maps it."""
        event = sample_event(key)
        new_job = sample_job(event)
        self.bodies[new_job.job_id] = (api, body if body is not None else v3_body())
        await self.store.accept_event(event, [new_job])
        if notify:
            self.pipeline.notify_new_jobs()
        job = await self.store.get_job(new_job.job_id)
        assert job is not None
        return job

    async def prepare(self, job: Job) -> None:
        """The test's mapping step: the body registered for the job, as `mapped`."""
        api, body = self.bodies[job.job_id]
        update = JobUpdate(export_body=orjson.dumps(body), api=api)
        await self.store.transition(job.job_id, {JobState.RECEIVED}, JobState.MAPPED, update)

    async def outbox(self, job_id: str) -> list[dict[str, Any]]:
        """The outbox rows committed for a job, decoded."""
        rows = await self.store.due_outbox(time.time() + 3600, limit=1000)
        return [orjson.loads(row.payload) for row in rows if row.job_id == job_id]


@asynccontextmanager
async def jobs_harness(
    tmp_path: Path,
    *,
    knobs: SimulatorKnobs | None = None,
    callbacks: bool = False,
    start: bool = True,
    on_ready: ReadyHook = ignore_ready,
    shared_simulator: Simulator | None = None,
    prepare_for: Callable[[JobsHarness], Any] | None = None,
    **settings: Any,
) -> AsyncIterator[JobsHarness]:
    """A pipeline on a fresh store and simulator; `callbacks` serves the callback route.

    `owner_id`, `lease_s`, `budget`, `budget_rescan_s` go to the pipeline; `clock` to the
    pipeline and the store alike; other settings to its config. `shared_simulator` keeps one
    simulator across two harnesses on the same `tmp_path` (a restart against the same cloud).
    `prepare_for` builds the pipeline's mapper from the harness (default: `harness.prepare`).
    """
    pipeline_keys = ("owner_id", "lease_s", "budget", "budget_rescan_s", "clock", "cache")
    ownership = {k: settings.pop(k) for k in pipeline_keys if k in settings}
    config = replace(FAST, **settings)
    pipeline_box: list[JobPipeline] = []

    async def route(request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "callbacks":
            accepted = await pipeline_box[0].on_callback(parts[1], parts[2])
            return web.Response(status=204 if accepted else 404)
        return web.Response(status=404)

    inner = SQLiteStore(tmp_path / "jobs.db", clock=ownership.get("clock", time.time))
    await inner.open()
    store = ObservedStore(inner)
    gate = RequestGate(
        config.request_rate_ceiling, clock=time.monotonic, hard_cap=config.max_requests_per_second
    )
    try:
        async with (
            (
                nullcontext(shared_simulator)
                if shared_simulator is not None
                else running_simulator(knobs or SimulatorKnobs(render_seconds=0.3))
            ) as simulator,
            client_for(simulator, before_request=gate) as client,
            tiny_server(route) as callback_base,
        ):
            harness = JobsHarness(store, simulator, client, gate, None)  # type: ignore[arg-type]
            pipeline = JobPipeline(
                store=store,  # type: ignore[arg-type]
                api=client,
                gate=gate,
                settings=config,
                prepare=prepare_for(harness) if prepare_for is not None else harness.prepare,
                outbox_for=outbox_for,
                public_url=callback_base if callbacks else None,
                on_ready=on_ready,
                **ownership,
            )
            harness.pipeline = pipeline
            pipeline_box.append(pipeline)
            async with anyio.create_task_group() as tg:
                harness.task_group = tg
                if start:
                    await harness.start()
                yield harness
                tg.cancel_scope.cancel()
    finally:
        await inner.close()
