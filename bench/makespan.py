"""Makespan: N committed jobs to all `ready` through the real JobPipeline, C renders at a time.

  studiohook  JobPipeline (preparer with the shipped config's template and route, submitter,
              tracker) on a SQLiteStore, talking to the simulator over loopback through the
              real client; the clock starts when the pipeline starts, with N `received` jobs
              already committed by the real intake, and stops at the last `ready` commit.
  baseline    an oracle in the same run against the same simulator: C workers, each exports
              one body (the very bodies studiohook produced), sleeps exactly R (it knows the
              render time), then polls until done. No store, no mapping, no guessing.
  ideal       ceil(N / C) * R, the floor no scheduler can beat.

The simulator runs in its own process so its CPU is not the daemon's.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from _shared import (
    WatchedStore,
    configure_bench_logging,
    emit_result,
    parse_args,
    print_table,
    ratio,
    real_pipeline,
    say,
    seed_events,
    shipped_catalog,
    shipped_config,
    shopify_source,
    simulator_process,
)

from service.aistudios.client import AIStudiosClient
from service.aistudios.simulator import SimulatorKnobs
from service.config import Config
from service.intake import StoreIntake
from service.jobs.ratelimit import RequestGate
from service.model import Job, JobState

FULL = (1000, 64, 2.0)
QUICK = (200, 64, 1.0)
REQUESTS_PER_S = 1000.0
"""High enough not to bind: C creates per R plus a few polls per job is far below it."""
POLL_FLOOR_S = 0.25
"""Both the poll floor and the first poll: nothing tuned to the render time."""
ORACLE_RECHECK_S = 0.02
API_KEY = "bench-key"


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """What one side measured."""

    makespan_s: float
    requests: int


async def _studiohook(cfg: Config, url: str, count: int, secret: str) -> tuple[Run, list[Job]]:
    state = cfg.service.state_dir
    store = WatchedStore(state / "studiohook.db", expected=count)
    await store.open()
    try:
        catalog = await shipped_catalog(cfg)
        source = shopify_source(cfg)
        say(f"seeding {count} events through the intake ...")
        await seed_events(StoreIntake(store, catalog), source, count, secret)
        async with real_pipeline(cfg, store, catalog, url, API_KEY) as (pipeline, calls):
            say("studiohook: pipeline started, waiting for every job to be ready ...")
            deadline = _ideal(count, cfg) * 4 + 30
            async with anyio.create_task_group() as tg:
                started = time.time()
                await tg.start(pipeline.run)
                with anyio.fail_after(deadline):
                    await store.all_ready.wait()
                tg.cancel_scope.cancel()
        makespan = max(store.ready_committed_at.values()) - started
        jobs = await store.jobs_in_states({JobState.READY}, limit=count)
    finally:
        await store.close()
    return Run(makespan, calls[0]), jobs


async def _oracle(url: str, bodies: list[dict[str, Any]], concurrency: int, render_s: float) -> Run:
    gate = RequestGate(REQUESTS_PER_S, time.monotonic)
    calls = [0]

    def count_call(_endpoint: str, _outcome: str) -> None:
        calls[0] += 1

    finished: list[float] = []
    pending = iter(enumerate(bodies))
    async with AIStudiosClient(
        base_url=url, legacy_base_url=url, api_key=API_KEY, before_request=gate, on_call=count_call
    ) as client:

        async def worker() -> None:
            for index, body in pending:
                project_id = await client.export_v3(body, name=f"oracle-{index}")
                await anyio.sleep(render_s)
                while not (await client.progress_v3(project_id)).done:
                    await anyio.sleep(ORACLE_RECHECK_S)
                finished.append(time.time())

        started = time.time()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return Run(max(finished) - started, calls[0])


def _ideal(count: int, cfg: Config) -> float:
    return (
        math.ceil(count / cfg.aistudios.max_concurrent_exports)
        * cfg.aistudios.simulator.render_seconds
    )


async def _exports_billed(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_simulator/state") as r:
        return int(orjson.loads(await r.read())["export_count"])


async def run(count: int, concurrency: int, render_s: float) -> dict[str, Any]:
    """Studiohook first, then the oracle with the same bodies on the same simulator."""
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-makespan-") as tmp:
        cfg = shipped_config(Path(tmp) / "state", secret)
        cfg = dataclasses.replace(
            cfg,
            aistudios=dataclasses.replace(
                cfg.aistudios,
                max_concurrent_exports=concurrency,
                max_requests_per_second=REQUESTS_PER_S,
                poll_min_interval_s=POLL_FLOOR_S,
                first_poll_s=POLL_FLOOR_S,
                simulator=dataclasses.replace(cfg.aistudios.simulator, render_seconds=render_s),
            ),
        )
        configure_bench_logging(Path(tmp) / "service.log")
        knobs = SimulatorKnobs(render_seconds=render_s)
        with simulator_process(knobs, Path(tmp) / "simulator.log") as url:
            ours, jobs = await _studiohook(cfg, url, count, secret)
            billed = await _exports_billed(url)
            bodies = [orjson.loads(job.export_body or b"{}") for job in jobs]
            say(f"baseline: oracle with {concurrency} workers, same {len(bodies)} bodies ...")
            oracle = await _oracle(url, bodies, concurrency, render_s)
    ideal = _ideal(count, cfg)
    polls = [job.polls for job in jobs]
    mean_polls = sum(polls) / len(polls)
    print_table(
        f"makespan: {count} jobs, render {render_s:g} s, {concurrency} concurrent exports "
        f"(poll floor and first poll {POLL_FLOOR_S:g} s, {REQUESTS_PER_S:g} requests/s allowed)",
        ["figure", "studiohook", "oracle", "ideal", "vs oracle", "vs ideal"],
        [
            ("makespan (s)", ours.makespan_s, oracle.makespan_s, ideal,
             ratio(ours.makespan_s, oracle.makespan_s), ratio(ours.makespan_s, ideal)),
            ("API requests", ours.requests, oracle.requests, "-",
             ratio(ours.requests, oracle.requests), "-"),
            ("progress polls per job (mean)", mean_polls, ratio(oracle.requests - count, count),
             "-", "-", "-"),
            ("exports billed by the simulator", billed, "-", count, "-", "-"),
        ],
    )  # fmt: skip
    return {
        "jobs": count,
        "concurrency": concurrency,
        "render_s": render_s,
        "studiohook_makespan_s": round(ours.makespan_s, 2),
        "oracle_makespan_s": round(oracle.makespan_s, 2),
        "ideal_makespan_s": ideal,
        "ratio_vs_oracle": round(ratio(ours.makespan_s, oracle.makespan_s), 3),
        "ratio_vs_ideal": round(ratio(ours.makespan_s, ideal), 3),
        "studiohook_requests": ours.requests,
        "oracle_requests": oracle.requests,
        "polls_per_job": round(mean_polls, 2),
        "max_polls_per_job": max(polls),
        "exports_billed": billed,
    }


def main() -> None:
    """`python bench/makespan.py [--quick]`."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "makespan bench")
    count, concurrency, render_s = QUICK if args.quick else FULL
    emit_result("makespan", anyio.run(run, count, concurrency, render_s))


if __name__ == "__main__":
    main()
