"""Flood: webhooks at the intake's full rate for D s; does mapping keep `received` from piling up?

wrk (one thread, 32 keep-alive connections, every request a new signed Shopify delivery, the
Lua script of bench/intake.py) floods one process for D seconds (30; `--quick` 10):

  baseline    intake alone: webhook_routes + StoreIntake + SQLiteStore, no pipeline running,
              so nothing leaves `received`: the rate intake reaches by itself, and the backlog
              a flood leaves when nothing maps it.
  studiohook  the same intake with the daemon's JobPipeline running in the same process (as
              `serve` wires it: intake wakes the mapper), the shipped config's route and
              template, and the simulator in its own process (2 s renders) behind the real
              client, so submits and polls share the CPU with intake and mapping.

Every 0.5 s a read-only connection samples the `received` jobs (count, oldest age). The
figure that matters: the oldest `received` job 2 s after the flood stops (target: none older
than 2 s), and the backlog curve during and after the flood.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from _shared import (
    SHOPIFY_SOURCE,
    configure_bench_logging,
    emit_result,
    print_table,
    ratio,
    real_pipeline,
    say,
    shipped_catalog,
    shipped_config,
    simulator_process,
)
from aiohttp import web
from intake import run_wrk, write_lua

from service.aistudios.simulator import SimulatorKnobs
from service.catalog import Catalog
from service.config import Config
from service.eventloop import loop_options
from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.store.sqlite import SQLiteStore

FULL_S, QUICK_S = 30.0, 10.0
CONNECTIONS = 32
SAMPLE_S = 0.5
AFTER_S = 2.0
TAIL_S = 10.0
TARGET_AGE_S = 2.0
RENDER_S = 2.0
API_KEY = "bench-key"


@dataclass
class Side:
    """One side's flood: wrk's count and the sampled `received` backlog."""

    requests: int = 0
    requests_per_s: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds since the flood started, received jobs, age of the oldest in s)."""
    flood_s: float = 0.0

    def at(self, t: float) -> tuple[int, float]:
        """The first sample taken at or after `t` s."""
        for when, count, age in self.curve:
            if when >= t:
                return count, age
        return (self.curve[-1][1], self.curve[-1][2]) if self.curve else (0, 0.0)

    @property
    def peak(self) -> int:
        return max((count for _, count, _ in self.curve), default=0)

    @property
    def drained_s(self) -> float:
        """Seconds after the flood stopped until no job was `received` (NaN: never)."""
        for when, count, _ in self.curve:
            if when >= self.flood_s and count == 0:
                return when - self.flood_s
        return float("nan")


def _sample(db_path: Path) -> tuple[int, float]:
    """Received jobs and the age of the oldest, read without taking any write lock."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        count, oldest = db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM jobs WHERE state = 'received'"
        ).fetchone()
    return int(count), (time.time() - oldest) if oldest is not None else 0.0


async def _flood(
    store: SQLiteStore,
    intake: StoreIntake,
    cfg: Config,
    *,
    script: Path,
    seconds: float,
    tag: str,
) -> Side:
    app = web.Application(client_max_size=cfg.http.max_body_bytes + 1)
    app.add_routes(
        webhook_routes(
            sources={s.name: s for s in cfg.sources},
            intake=intake,
            max_body_bytes=cfg.http.max_body_bytes,
            body_timeout_s=cfg.http.body_timeout_s,
        )
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/{SHOPIFY_SOURCE}"
    side = Side()
    started = time.monotonic()
    flood_over = anyio.Event()

    async def sample() -> None:
        while True:
            count, age = await anyio.to_thread.run_sync(_sample, store.path)
            side.curve.append((time.monotonic() - started, count, age))
            if flood_over.is_set():
                after = time.monotonic() - started - side.flood_s
                if after >= TAIL_S or (count == 0 and after >= AFTER_S):
                    return
            await anyio.sleep(SAMPLE_S)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            figures = await run_wrk(script, url, seconds=seconds, connections=CONNECTIONS, tag=tag)
            side.flood_s = time.monotonic() - started
            flood_over.set()
    finally:
        await runner.cleanup()
    side.requests = int(figures["requests"])
    side.requests_per_s = side.requests / (figures["duration_us"] / 1e6)
    side.non_2xx = int(figures["non_2xx"])
    side.socket_errors = int(figures["socket_errors"])
    return side


async def _baseline(cfg: Config, catalog: Catalog, tmp: Path, seconds: float) -> Side:
    store = SQLiteStore(tmp / "baseline.db")
    await store.open()
    try:
        return await _flood(
            store, StoreIntake(store, catalog), cfg,
            script=tmp / "shopify.lua", seconds=seconds, tag="b",
        )  # fmt: skip
    finally:
        await store.close()


async def _studiohook(cfg: Config, catalog: Catalog, tmp: Path, seconds: float) -> Side:
    knobs = SimulatorKnobs(render_seconds=RENDER_S)
    store = SQLiteStore(tmp / "studiohook.db")
    await store.open()
    try:
        with simulator_process(knobs, tmp / "simulator.log") as api_url:
            async with real_pipeline(cfg, store, catalog, api_url, API_KEY) as (pipeline, _):
                intake = StoreIntake(store, catalog, on_new_jobs=pipeline.notify_new_jobs)
                async with anyio.create_task_group() as tg:
                    await tg.start(pipeline.run)
                    side = await _flood(
                        store, intake, cfg, script=tmp / "shopify.lua", seconds=seconds, tag="s"
                    )
                    tg.cancel_scope.cancel()
    finally:
        await store.close()
    return side


def _curve_rows(ours: Side, baseline: Side) -> list[tuple[object, ...]]:
    marks = sorted({*range(0, int(ours.flood_s) + 1, max(1, int(ours.flood_s) // 6))})
    rows: list[tuple[object, ...]] = []
    for t in marks:
        ours_n, ours_age = ours.at(float(t))
        base_n, _ = baseline.at(float(t))
        rows.append((f"{t} s", ours_n, round(ours_age, 2), base_n))
    for after in (0.0, 1.0, AFTER_S, 5.0):
        ours_n, ours_age = ours.at(ours.flood_s + after)
        base_n, _ = baseline.at(baseline.flood_s + after)
        rows.append((f"flood end + {after:g} s", ours_n, round(ours_age, 2), base_n))
    return rows


async def run(seconds: float) -> dict[str, Any]:
    """Baseline (intake alone) first, then intake with the pipeline, same flood."""
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp_dir:
        tmp = Path(tmp_dir)
        cfg = shipped_config(tmp / "state", secret)
        configure_bench_logging(tmp / "service.log")
        write_lua(tmp / "shopify.lua", secret)
        catalog = await shipped_catalog(cfg)
        say(f"baseline: intake alone, no pipeline, wrk -t1 -c{CONNECTIONS} -d{seconds:g}s ...")
        baseline = await _baseline(cfg, catalog, tmp, seconds)
        say("studiohook: intake with the pipeline mapping, submitting and polling ...")
        ours = await _studiohook(cfg, catalog, tmp, seconds)
    count_after, age_after = ours.at(ours.flood_s + AFTER_S)
    print_table(
        f"flood: signed webhooks for {seconds:g} s at full rate (wrk -t1 -c{CONNECTIONS})",
        ["figure", "studiohook", "intake alone", "ratio"],
        [
            ("accepted/s", ours.requests_per_s, baseline.requests_per_s,
             ratio(ours.requests_per_s, baseline.requests_per_s)),
            ("accepted", ours.requests, baseline.requests, "-"),
            ("non-2xx / socket errors", f"{ours.non_2xx} / {ours.socket_errors}",
             f"{baseline.non_2xx} / {baseline.socket_errors}", "-"),
            ("peak `received` backlog", ours.peak, baseline.peak, ratio(ours.peak, baseline.peak)),
            (f"`received` {AFTER_S:g} s after the flood", count_after,
             baseline.at(baseline.flood_s + AFTER_S)[0], "-"),
            (f"oldest `received` {AFTER_S:g} s after (s)", round(age_after, 2), "-",
             f"target <= {TARGET_AGE_S:g}"),
            ("backlog gone after the flood (s)", ours.drained_s, "-", "-"),
        ],
    )  # fmt: skip
    print_table(
        "backlog curve: `received` jobs (studiohook with the age of its oldest; intake alone)",
        ["time", "studiohook", "oldest (s)", "intake alone"],
        _curve_rows(ours, baseline),
    )
    met = age_after <= TARGET_AGE_S
    print(f"{'OK' if met else 'MISSED'}: oldest received job {AFTER_S:g} s after the flood "
          f"is {age_after:.2f} s old (target <= {TARGET_AGE_S:g} s)")  # fmt: skip
    return {
        "seconds": seconds,
        "studiohook_rps": round(ours.requests_per_s, 1),
        "baseline_rps": round(baseline.requests_per_s, 1),
        "studiohook_accepted": ours.requests,
        "peak_received": ours.peak,
        "received_after_2s": count_after,
        "oldest_received_after_2s": round(age_after, 3),
        "drained_after_s": round(ours.drained_s, 2),
        "baseline_received_after": baseline.at(baseline.flood_s + AFTER_S)[0],
        "curve": [(round(t, 2), n, round(a, 2)) for t, n, a in ours.curve],
        "target_met": met,
    }


def main() -> None:
    """`python bench/flood.py [--quick] [--seconds D]`."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench/flood.py needs wrk on the PATH (Debian: apt-get install wrk)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_S:g} s, not {FULL_S:g} s")
    parser.add_argument("--seconds", type=float, help="flood length (overrides --quick)")
    args = parser.parse_args()
    seconds = args.seconds or (QUICK_S if args.quick else FULL_S)
    options, _ = loop_options(prefer_uvloop=True)
    emit_result("flood", anyio.run(run, seconds, backend_options=options))


if __name__ == "__main__":
    main()
