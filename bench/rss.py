"""Memory with N renders in flight: the RSS of a daemon process that follows N `submitted` jobs.

Set-up, each part in its own process so only the daemon's memory is measured:
  simulator  the simulated cloud, renders of an hour (nothing finishes during the run);
  seeder     a first daemon: N signed Shopify events through the real intake, mapped by the
             real preparer, exported by the real submitter; it exits with N jobs `submitted`,
             as a daemon stopped with N renders under way would;
  measured   this process, a restarted daemon: store, client and pipeline built (nothing
             loaded yet), then the pipeline recovers and tracks all N and polls them at the
             shipped rate for a while.

RSS (psutil) is read: after imports (the baseline: the same process before anything loaded),
with everything built but no job loaded, and with N tracked (plus the peak seen meanwhile).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import multiprocessing
import resource
import secrets
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
from _shared import (
    configure_bench_logging,
    emit_result,
    parse_args,
    print_table,
    ratio,
    real_pipeline,
    rss_bytes,
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
from service.jobs.pipeline import JobPipeline
from service.jobs.prepare import Preparer
from service.jobs.ratelimit import RequestGate
from service.model import Job, JobState
from service.notify.build import outbox_rows_for
from service.store.sqlite import SQLiteStore

FULL_N = 10_000
QUICK_N = 1_000
RENDER_S = 3600.0
SEED_REQUESTS_PER_S = 5000.0
SEED_CONCURRENCY = 128
SETTLE_AFTER_FIRST_POLL_S = 3.0
SEED_TIMEOUT_S = 150.0
API_KEY = "bench-key"
MB = 1024 * 1024


# --- the seeding daemon (a child process) ---------------------------------------------------


def seeder_main(state: Path, secret: str, url: str, count: int, conn: Connection) -> None:
    """Leave `count` jobs `submitted` in the store under `state`, then report and exit."""
    configure_bench_logging(state.parent / "seeder.log")
    conn.send(asyncio.run(_seed(state, secret, url, count)))


async def _seed(state: Path, secret: str, url: str, count: int) -> dict[str, float]:
    started = time.perf_counter()
    cfg = _config(state, secret, count, SEED_REQUESTS_PER_S)
    catalog = await shipped_catalog(cfg)
    store = SQLiteStore(state / "studiohook.db")
    await store.open()
    try:
        await seed_events(StoreIntake(store, catalog), shopify_source(cfg), count, secret)
        prepare = Preparer(cfg, catalog, store, lambda j, e: outbox_rows_for(cfg, j, e))
        received = await store.jobs_in_states({JobState.RECEIVED}, limit=count)
        limiter = anyio.CapacityLimiter(SEED_CONCURRENCY)

        async def map_one(job: Job) -> None:
            async with limiter:
                await prepare(job)

        async with anyio.create_task_group() as tg:
            for job in received:
                tg.start_soon(map_one, job)
        gate = RequestGate(SEED_REQUESTS_PER_S, time.monotonic)
        async with AIStudiosClient(
            base_url=url, legacy_base_url=url, api_key=API_KEY, before_request=gate
        ) as client:
            pipeline = JobPipeline(
                store=store,
                api=client,
                gate=gate,
                settings=cfg.aistudios,
                prepare=prepare,
                outbox_for=lambda j, e: outbox_rows_for(cfg, j, e),
            )
            async with anyio.create_task_group() as tg:
                await tg.start(pipeline.run)
                with anyio.fail_after(SEED_TIMEOUT_S):
                    while (await store.count_jobs_by_state())[JobState.SUBMITTED] < count:
                        await anyio.sleep(0.25)
                tg.cancel_scope.cancel()
        submitted = (await store.count_jobs_by_state())[JobState.SUBMITTED]
    finally:
        await store.close()
    return {"submitted": submitted, "seconds": time.perf_counter() - started}


def _config(state: Path, secret: str, count: int, requests_per_s: float | None = None) -> Config:
    cfg = shipped_config(state, secret)
    changes: dict[str, Any] = {"max_concurrent_exports": count}
    if requests_per_s is not None:
        changes["max_requests_per_second"] = requests_per_s
    return dataclasses.replace(cfg, aistudios=dataclasses.replace(cfg.aistudios, **changes))


def _seed_in_child(state: Path, secret: str, url: str, count: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    seeder = context.Process(target=seeder_main, args=(state, secret, url, count, theirs))
    seeder.start()
    try:
        if not ours.poll(SEED_TIMEOUT_S + 30):
            raise RuntimeError("the seeder did not finish")
        result: dict[str, float] = ours.recv()
    finally:
        seeder.join(timeout=10)
        if seeder.is_alive():
            seeder.kill()
            seeder.join()
    return result


# --- the measured daemon (this process) ----------------------------------------------------


@dataclasses.dataclass
class Readings:
    """RSS at each step, in bytes, and what the pipeline had done by then."""

    base: int
    built: int = 0
    tracked: int = 0
    trimmed: int = 0
    peak: int = 0
    tracked_jobs: int = 0
    polls: int = 0
    window_s: float = 0.0


async def _measure(state: Path, secret: str, url: str, count: int, readings: Readings) -> None:
    cfg = _config(state, secret, count)
    catalog = await shipped_catalog(cfg)
    store = SQLiteStore(state / "studiohook.db")
    await store.open()
    try:
        async with real_pipeline(cfg, store, catalog, url, API_KEY) as (pipeline, calls):
            readings.built = rss_bytes()
            say(f"measured daemon: recovering {count} renders ...")
            window_s = cfg.aistudios.first_poll_s + SETTLE_AFTER_FIRST_POLL_S
            async with anyio.create_task_group() as tg:
                started = time.monotonic()
                await tg.start(pipeline.run)
                await anyio.sleep(window_s - (time.monotonic() - started))
                readings.tracked = rss_bytes()
                # The kernel updates the high-water mark lazily: never report it below a reading.
                high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                readings.peak = max(high_water, readings.tracked)
                readings.trimmed = _rss_after_trim()
                readings.tracked_jobs = pipeline.tracker.tracked
                readings.polls = calls[0]
                readings.window_s = time.monotonic() - started
                tg.cancel_scope.cancel()
    finally:
        await store.close()


def _rss_after_trim() -> int:
    """RSS once the garbage is collected and glibc handed its free heap back to the system:
    what the process really holds, as opposed to what the allocator kept from a peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    return rss_bytes()


async def run(count: int, readings: Readings) -> dict[str, Any]:
    """Simulator and seeder in their own processes, then the measurement here."""
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        configure_bench_logging(Path(tmp) / "service.log")
        knobs = SimulatorKnobs(render_seconds=RENDER_S)
        with simulator_process(knobs, Path(tmp) / "simulator.log") as url:
            say(f"seeder: {count} events -> intake -> mapped -> exported (separate process) ...")
            seeded = await anyio.to_thread.run_sync(_seed_in_child, state, secret, url, count)
            say(f"seeder: {int(seeded['submitted'])} submitted in {seeded['seconds']:.1f} s")
            await _measure(state, secret, url, count, readings)
    per_job = ratio(readings.tracked - readings.built, readings.tracked_jobs)
    live_per_job = ratio(readings.trimmed - readings.built, readings.tracked_jobs)
    print_table(
        f"RSS of the daemon process with {readings.tracked_jobs:,} renders tracked "
        f"({readings.polls} API calls in {readings.window_s:.1f} s at the shipped rate)",
        ["reading", "MB", "vs baseline"],
        [
            ("baseline: after imports, nothing loaded", readings.base / MB, 1.0),
            ("store + client + pipeline built, 0 jobs", readings.built / MB,
             ratio(readings.built, readings.base)),
            (f"{readings.tracked_jobs:,} tracked (end of window)", readings.tracked / MB,
             ratio(readings.tracked, readings.base)),
            ("peak (ru_maxrss: recovery included)", readings.peak / MB,
             ratio(readings.peak, readings.base)),
            (f"{readings.tracked_jobs:,} tracked, after gc + malloc_trim", readings.trimmed / MB,
             ratio(readings.trimmed, readings.base)),
            ("growth for the jobs (tracked - built)", (readings.tracked - readings.built) / MB,
             "-"),
            ("bytes per tracked job (RSS)", round(per_job), "-"),
            ("bytes per tracked job (after trim)", round(live_per_job), "-"),
        ],
    )  # fmt: skip
    return {
        "jobs": count,
        "tracked": readings.tracked_jobs,
        "rss_base_mb": round(readings.base / MB, 1),
        "rss_built_mb": round(readings.built / MB, 1),
        "rss_tracked_mb": round(readings.tracked / MB, 1),
        "rss_peak_mb": round(readings.peak / MB, 1),
        "bytes_per_job": round(per_job),
        "bytes_per_job_after_trim": round(live_per_job),
        "rss_after_trim_mb": round(readings.trimmed / MB, 1),
        "tracked_vs_base": round(ratio(readings.tracked, readings.base), 3),
        "api_calls_in_window": readings.polls,
        "seed_seconds": round(seeded["seconds"], 1),
    }


def main() -> None:
    """`python bench/rss.py [--quick]`: --quick tracks 1,000 jobs instead of 10,000."""
    readings = Readings(base=rss_bytes())
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "rss bench")
    emit_result("rss", anyio.run(run, QUICK_N if args.quick else FULL_N, readings))


if __name__ == "__main__":
    main()
