"""Detection lag: from the render finishing (the simulator knows when) to the `ready` commit.

The daemon's own pieces, wired as `serve` wires them: signed webhooks over HTTP into
webhook_routes + StoreIntake, the JobPipeline (preparer, submitter, tracker) on a SQLiteStore,
the real client through the shared request gate, and the admin routes serving
`/callbacks/{job_id}/{token}`. Poll timing and request rate are the shipped defaults; only
`max_concurrent_exports` is raised so every job renders at once and the run stays short.

  polling only   no public_url: exports carry no webhookUrl; the tracker's polls find 100 %.
  callbacks      public_url is the bench's own listener: each export carries webhookUrl, the
                 simulator POSTs the completion callback, which brings a confirming poll forward.

Each job gets its own render length (spread evenly over a few seconds), the same in both
modes, so no single length flatters either. The simulator runs in this process on the wall
clock, so "finished" (created_at + render length) and the commit time share one clock.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from _shared import (
    WatchedStore,
    configure_bench_logging,
    emit_result,
    parse_args,
    percentile,
    print_table,
    ratio,
    say,
    shipped_catalog,
    shipped_config,
    shopify_delivery,
)
from aiohttp import web

from service.admin import AdminApi
from service.aistudios.client import AIStudiosClient
from service.aistudios.responses import Progress, ProjectState, ProjectSummary
from service.aistudios.simulator import Simulator, SimulatorKnobs
from service.config import Config
from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.jobs.pipeline import JobPipeline
from service.jobs.prepare import Preparer
from service.jobs.ratelimit import RequestGate
from service.metrics import Metrics
from service.notify.build import outbox_rows_for

FULL = (20, 3.0, 9.0)
QUICK = (8, 2.0, 4.0)
API_KEY = "bench-key"


class OwnLengthRenders:
    """The real client; right after the simulator created a render, it is given its length.

    Everything else goes straight to the client, so the pipeline sees the real API.
    """

    def __init__(self, client: AIStudiosClient, simulator: Simulator, lengths: list[float]) -> None:
        self._client = client
        self._simulator = simulator
        self._lengths = iter(lengths)

    async def export_v3(
        self, body: dict[str, Any], *, name: str, webhook_url: str | None = None
    ) -> str:
        """Create, then set this render's length on the simulated cloud."""
        project_id = await self._client.export_v3(body, name=name, webhook_url=webhook_url)
        self._simulator.projects[project_id].render_seconds = next(self._lengths)
        return project_id

    async def create_draft_v3(self, body: dict[str, Any], *, name: str) -> str:
        """The real draft create (not billed)."""
        return await self._client.create_draft_v3(body, name=name)

    async def export_project_v3(self, project_id: str, *, webhook_url: str | None = None) -> str:
        """Export the draft, then set this render's length on the simulated cloud."""
        exported = await self._client.export_project_v3(project_id, webhook_url=webhook_url)
        self._simulator.projects[exported].render_seconds = next(self._lengths)
        return exported

    async def get_project_v3(self, project_id: str) -> ProjectState:
        """The real project read."""
        return await self._client.get_project_v3(project_id)

    async def export_legacy(self, scenes: list[dict[str, Any]]) -> str:
        """Not used by the shipped route (a v3 template)."""
        return await self._client.export_legacy(scenes)

    async def progress_v3(self, project_id: str) -> Progress:
        """The real progress call."""
        return await self._client.progress_v3(project_id)

    async def progress_legacy(self, key: str) -> Progress:
        """The real progress call."""
        return await self._client.progress_legacy(key)

    async def find_project_by_name(self, name: str) -> ProjectSummary | None:
        """The real lookup."""
        return await self._client.find_project_by_name(name)


@dataclasses.dataclass(frozen=True, slots=True)
class Lags:
    """Per job: render finished -> ready committed, and (callbacks) callback -> ready."""

    finish_to_ready_s: list[float]
    callback_to_ready_s: list[float]
    callbacks_received: int
    polls: list[int]


async def _serve(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=1024 * 1024 + 1)
    app.add_routes(routes)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _post_webhooks(url: str, count: int, secret: str) -> None:
    async with aiohttp.ClientSession() as session:
        for index in range(count):
            delivery = shopify_delivery(index, secret)
            async with session.post(url, data=delivery.body, headers=delivery.headers) as r:
                if r.status != 202:
                    raise RuntimeError(f"webhook {index} answered {r.status}: {await r.text()}")


async def _one_mode(
    tmp: Path, cfg: Config, lengths: list[float], secret: str, *, callbacks: bool
) -> Lags:
    count = len(lengths)
    store = WatchedStore(tmp / "studiohook.db", expected=count)
    await store.open()
    simulator = Simulator(SimulatorKnobs(render_seconds=max(lengths)), clock=time.time)
    sim_url = await simulator.start()
    callback_at: dict[str, float] = {}
    pipelines: list[JobPipeline] = []

    async def on_callback(job_id: str, token: str) -> bool:
        callback_at.setdefault(job_id, time.time())
        return await pipelines[0].on_callback(job_id, token)

    try:
        catalog = await shipped_catalog(cfg)
        gate = RequestGate(
        cfg.aistudios.request_rate_ceiling,
        time.monotonic,
        hard_cap=cfg.aistudios.max_requests_per_second,
    )
        async with AIStudiosClient(
            base_url=sim_url, legacy_base_url=sim_url, api_key=API_KEY, before_request=gate
        ) as client:
            intake = StoreIntake(store, catalog, on_new_jobs=lambda: _wake(pipelines))
            admin = AdminApi(
                store=store,
                metrics=Metrics(),
                checks={},
                on_callback=on_callback,
                on_retry=lambda: None,
                admin_token=None,
            )
            routes = webhook_routes(
                sources={s.name: s for s in cfg.sources},
                intake=intake,
                max_body_bytes=cfg.http.max_body_bytes,
                body_timeout_s=cfg.http.body_timeout_s,
            )
            runner, http_url = await _serve([*routes, *admin.routes()])
            try:
                pipeline = JobPipeline(
                    store=store,
                    api=OwnLengthRenders(client, simulator, lengths),
                    gate=gate,
                    settings=cfg.aistudios,
                    prepare=Preparer(cfg, catalog, store, lambda j, e: outbox_rows_for(cfg, j, e)),
                    outbox_for=lambda j, e: outbox_rows_for(cfg, j, e),
                    public_url=http_url if callbacks else None,
                )
                pipelines.append(pipeline)
                async with anyio.create_task_group() as tg:
                    await tg.start(pipeline.run)
                    await _post_webhooks(f"{http_url}/hooks/shopify", count, secret)
                    with anyio.fail_after(max(lengths) * 4 + 60):
                        await store.all_ready.wait()
                    tg.cancel_scope.cancel()
            finally:
                await runner.cleanup()
        return await _lags(store, simulator, callback_at)
    finally:
        await simulator.stop()
        await store.close()


def _wake(pipelines: list[JobPipeline]) -> None:
    for pipeline in pipelines:
        pipeline.notify_new_jobs()


async def _lags(store: WatchedStore, simulator: Simulator, callback_at: dict[str, float]) -> Lags:
    finish_to_ready: list[float] = []
    callback_to_ready: list[float] = []
    polls: list[int] = []
    for job_id, committed_at in store.ready_committed_at.items():
        job = await store.get_job(job_id)
        if job is None or job.project_id is None:
            raise RuntimeError(f"ready job {job_id} has no project")
        project = simulator.projects[job.project_id]
        finish_to_ready.append(committed_at - (project.created_at + project.render_seconds))
        polls.append(job.polls)
        if job_id in callback_at:
            callback_to_ready.append(committed_at - callback_at[job_id])
    return Lags(finish_to_ready, callback_to_ready, len(callback_at), polls)


async def run(count: int, shortest_s: float, longest_s: float) -> dict[str, Any]:
    """Polling only first, then callbacks, each on a fresh store and simulator."""
    step = (longest_s - shortest_s) / max(count - 1, 1)
    lengths = [shortest_s + i * step for i in range(count)]
    secret = secrets.token_hex(16)
    results: dict[str, Lags] = {}
    for mode in ("polling", "callbacks"):
        with tempfile.TemporaryDirectory(prefix=f"bench-lag-{mode}-") as tmp:
            cfg = shipped_config(Path(tmp) / "state", secret)
            cfg = dataclasses.replace(
                cfg, aistudios=dataclasses.replace(cfg.aistudios, max_concurrent_exports=count)
            )
            configure_bench_logging(Path(tmp) / "service.log")
            say(f"{mode}: {count} jobs, renders {shortest_s:g}-{longest_s:g} s ...")
            results[mode] = await _one_mode(
                Path(tmp), cfg, lengths, secret, callbacks=mode == "callbacks"
            )
    return _report(cfg, count, shortest_s, longest_s, results)


def _report(
    cfg: Config, count: int, shortest_s: float, longest_s: float, results: dict[str, Lags]
) -> dict[str, Any]:
    polled, called = results["polling"], results["callbacks"]
    a = cfg.aistudios
    rows: list[tuple[object, ...]] = []
    for name, pct in (("median", 50), ("p90", 90), ("max", 100)):
        p = percentile(polled.finish_to_ready_s, pct)
        c = percentile(called.finish_to_ready_s, pct)
        rows.append((f"finish -> ready commit, {name} (s)", c, p, ratio(c, p)))
    mean_polls = [sum(r.polls) / len(r.polls) for r in (called, polled)]
    rows.append(("progress polls per job (mean)", *mean_polls, ratio(*mean_polls)))
    rows.append(("callbacks received", called.callbacks_received, polled.callbacks_received, "-"))
    rows.append(
        (
            "callback -> ready commit, median (s)",
            percentile(called.callback_to_ready_s, 50),
            "-",
            "-",
        )
    )
    print_table(
        f"detection lag: {count} jobs, renders {shortest_s:g}-{longest_s:g} s; poll floor "
        f"{a.poll_min_interval_s:g} s, first poll {a.first_poll_s:g} s, "
        f"request pace adaptive up to {a.request_rate_ceiling:g}/s",
        ["figure", "callbacks", "polling only", "ratio"],
        rows,
    )
    return {
        "jobs": count,
        "render_s": [shortest_s, longest_s],
        "callbacks_median_s": round(percentile(called.finish_to_ready_s, 50), 3),
        "callbacks_p90_s": round(percentile(called.finish_to_ready_s, 90), 3),
        "polling_median_s": round(percentile(polled.finish_to_ready_s, 50), 3),
        "polling_p90_s": round(percentile(polled.finish_to_ready_s, 90), 3),
        "median_ratio": round(
            ratio(
                percentile(called.finish_to_ready_s, 50), percentile(polled.finish_to_ready_s, 50)
            ),
            3,
        ),
        "callbacks_received": called.callbacks_received,
        "callbacks_polls_per_job": round(mean_polls[0], 2),
        "polling_polls_per_job": round(mean_polls[1], 2),
    }


def main() -> None:
    """`python bench/detection_lag.py [--quick]`."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "detection lag bench")
    emit_result("detection_lag", anyio.run(run, *(QUICK if args.quick else FULL)))


if __name__ == "__main__":
    main()
