"""Credits: one scripted shop day, guard rails off then on, and the exports each one bills.

  the day     a bulk import of N distinct products; then K products saved S times each in
              quick succession (a merchant editing); then, once their first video is ready,
              R of the imported products re-published unchanged.
  off         the shipped config's Shopify route as it is: no `[budget]`, no `cache_seconds`,
              no coalescing. Every event is one billed export.
  on          the same route with a daily cap (`[budget] exports_per_day`), a render cache
              (`cache_seconds = 86400`) and coalescing (`coalesce_key = "{{ event.id }}"`,
              `coalesce_seconds` W: the merchant's minute, scaled down).

Both sides run the real pipeline (the real intake, a SQLiteStore in a temp dir, the real
client, the URL probe) against one simulator over loopback, in its own process, with short
renders. "Billed" is the simulator's own count of billed exports during that side's day, not
studiohook's. Held, reused and superseded jobs are counted from the store at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from _shared import (
    SHOPIFY_SOURCE,
    configure_bench_logging,
    emit_result,
    print_table,
    raw_event_of,
    real_pipeline,
    say,
    shipped_catalog,
    shipped_config,
    shopify_delivery,
    shopify_source,
    simulator_process,
)

from service.aistudios.simulator import SimulatorKnobs
from service.app import budget_limits
from service.config import BudgetConfig, Config
from service.intake import StoreIntake
from service.jobs.submitter import RenderCache
from service.model import JobState
from service.notify.probe import HttpProbe
from service.store.sqlite import SQLiteStore

API_KEY = "bench-key"
CACHE_S = 86_400.0
CONCURRENCY = 64
SAVE_GAP_S = 0.05
SETTLE_LOOK_S = 0.05
SETTLE_TIMEOUT_S = 120.0
PRODUCT_ID_BASE = 9_000_000_000_000
IN_FLIGHT = frozenset(
    {
        JobState.RECEIVED,
        JobState.MAPPED,
        JobState.SUBMITTING,
        JobState.SUBMITTED,
        JobState.RECONCILE,
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Day:
    """The script's sizes and the guard rails' settings."""

    imports: int
    edited: int
    saves: int
    republished: int
    cap: int
    coalesce_s: float
    render_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class Side:
    """What one side of the day sent and what it cost."""

    events: int
    billed: int
    ready: int
    held: int
    reused: int
    superseded: int
    seconds: float


def parse_args() -> Day:
    """Sizes of the day; `--quick` makes it smaller."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--quick", action="store_true", help="20 imports, 3 x 3 saves, 5 re-publishes"
    )
    parser.add_argument("--imports", type=int, default=60, help="distinct products imported (60)")
    parser.add_argument("--edited", type=int, default=5, help="products saved repeatedly (5)")
    parser.add_argument("--saves", type=int, default=4, help="saves of each edited product (4)")
    parser.add_argument("--republished", type=int, default=10, help="unchanged re-publishes (10)")
    parser.add_argument("--cap", type=int, default=None, help="exports_per_day (default: imports)")
    parser.add_argument("--coalesce-s", type=float, default=2.0, help="coalesce_seconds (2)")
    parser.add_argument("--render-s", type=float, default=1.0, help="render length (1 s)")
    args = parser.parse_args()
    if args.quick:
        args.imports, args.edited, args.saves, args.republished = 20, 3, 3, 5
    cap = args.imports if args.cap is None else args.cap
    return Day(
        args.imports, args.edited, args.saves, args.republished, cap, args.coalesce_s, args.render_s
    )


def _configured(cfg: Config, day: Day, *, guarded: bool) -> Config:
    """The shipped config with room for the day's renders; the guard rails when `guarded`."""
    aistudios = dataclasses.replace(cfg.aistudios, max_concurrent_exports=CONCURRENCY)
    if not guarded:
        return dataclasses.replace(cfg, aistudios=aistudios)
    routes = tuple(
        dataclasses.replace(
            route,
            cache_seconds=CACHE_S,
            coalesce_key="{{ event.id }}",
            coalesce_seconds=day.coalesce_s,
        )
        if route.source == SHOPIFY_SOURCE
        else route
        for route in cfg.routes
    )
    return dataclasses.replace(
        cfg,
        aistudios=aistudios,
        routes=routes,
        budget=BudgetConfig(exports_per_day=day.cap),
    )


async def _billed_so_far(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_simulator/state") as r:
        state: dict[str, Any] = orjson.loads(await r.read())
    return int(state["export_count"])


async def _settled(store: SQLiteStore) -> None:
    """Wait until no job is on its way (each is ready, held, superseded or ended)."""
    with anyio.fail_after(SETTLE_TIMEOUT_S):
        while True:
            counts = await store.count_jobs_by_state()
            if not any(counts.get(state, 0) for state in IN_FLIGHT):
                return
            await anyio.sleep(SETTLE_LOOK_S)


async def _ready_products(store: SQLiteStore, below: int) -> list[int]:
    """Imported products (index < `below`) whose first video is ready, by index."""
    found: set[int] = set()
    for job in await store.jobs_in_states({JobState.READY}, limit=100_000):
        event = await store.get_event(job.event_row)
        if event is not None:
            index = int(orjson.loads(event.body)["id"]) - PRODUCT_ID_BASE
            if index < below:
                found.add(index)
    return sorted(found)


async def _play(cfg: Config, url: str, day: Day, secret: str, *, guarded: bool) -> Side:
    """One side of the day on a fresh store; the simulator's billed count before and after."""
    cfg = _configured(cfg, day, guarded=guarded)
    store = SQLiteStore(cfg.service.state_dir / ("on.db" if guarded else "off.db"))
    await store.open()
    probe = HttpProbe()
    windows = {r.name: r.cache_seconds for r in cfg.routes if r.cache_seconds}
    cache = RenderCache(seconds_for=lambda job: windows.get(job.route), probe=probe)
    sent = [0]
    try:
        catalog = await shipped_catalog(cfg)
        source = shopify_source(cfg)
        billed_before = await _billed_so_far(url)
        started = time.perf_counter()
        async with (
            real_pipeline(
                cfg,
                store,
                catalog,
                url,
                API_KEY,
                budget=budget_limits(cfg),
                cache=cache if windows else None,
            ) as (pipeline, _calls),
            anyio.create_task_group() as tg,
        ):
            intake = StoreIntake(store, catalog, on_new_jobs=pipeline.notify_new_jobs)

            async def send(index: int, edit: int | None = None) -> None:
                delivery = shopify_delivery(index, secret, edit=edit)
                await intake.accept(source, raw_event_of(delivery), delivery.body)
                sent[0] += 1

            await tg.start(pipeline.run)
            async with anyio.create_task_group() as bulk:
                for index in range(day.imports):
                    bulk.start_soon(send, index)
            for edit in range(day.saves):
                for offset in range(day.edited):
                    await send(day.imports + offset, edit)
                await anyio.sleep(SAVE_GAP_S)
            await _settled(store)
            for index in (await _ready_products(store, day.imports))[: day.republished]:
                await send(index)
            await _settled(store)
            tg.cancel_scope.cancel()
        seconds = time.perf_counter() - started
        billed = await _billed_so_far(url) - billed_before
        counts = await store.count_jobs_by_state()
        ready = await store.jobs_in_states({JobState.READY}, limit=100_000)
    finally:
        await probe.aclose()
        await store.close()
    return Side(
        events=sent[0],
        billed=billed,
        ready=len(ready),
        held=counts.get(JobState.HELD, 0),
        reused=sum(1 for job in ready if job.reused_from is not None),
        superseded=counts.get(JobState.SUPERSEDED, 0),
        seconds=seconds,
    )


async def run(day: Day) -> dict[str, Any]:
    """The day with the guard rails off, then on, against one simulator."""
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-credits-") as tmp:
        cfg = shipped_config(Path(tmp) / "state", secret)
        configure_bench_logging(Path(tmp) / "service.log")
        knobs = SimulatorKnobs(render_seconds=day.render_s)
        with simulator_process(knobs, Path(tmp) / "simulator.log") as url:
            say("the day with the guard rails off ...")
            off = await _play(cfg, url, day, secret, guarded=False)
            say("the same day with a cap, a render cache and coalescing ...")
            on = await _play(cfg, url, day, secret, guarded=True)
    saved = off.billed - on.billed
    share = saved / off.billed if off.billed else float("nan")
    rows = [
        ("events sent", off.events, on.events),
        ("exports billed (simulator's count)", off.billed, on.billed),
        ("jobs with a video ready", off.ready, on.ready),
        ("  of which reused from the cache", off.reused, on.reused),
        ("jobs held by the cap", off.held, on.held),
        ("jobs superseded by a newer save", off.superseded, on.superseded),
        ("wall time of the day (s)", off.seconds, on.seconds),
    ]
    print_table(
        f"credits: {day.imports} products imported, {day.edited} products saved "
        f"{day.saves} times each, {day.republished} re-published unchanged; renders "
        f"{day.render_s:g} s. On: exports_per_day = {day.cap}, cache_seconds = {CACHE_S:g}, "
        f"coalesce_seconds = {day.coalesce_s:g}",
        ["figure", "guard rails off", "on"],
        rows,
    )
    print(
        f"billed {saved} fewer of {off.billed} ({share:.0%}): {on.superseded} saves coalesced "
        f"and {on.reused} re-publishes reused never cost anything; {on.held} held jobs wait "
        "for the next UTC day (deferred by the cap, not saved)"
    )
    return {
        "imports": day.imports,
        "edited": day.edited,
        "saves": day.saves,
        "republished": day.republished,
        "cap": day.cap,
        "coalesce_s": day.coalesce_s,
        "render_s": day.render_s,
        "off": dataclasses.asdict(off) | {"seconds": round(off.seconds, 2)},
        "on": dataclasses.asdict(on) | {"seconds": round(on.seconds, 2)},
        "saved_exports": saved,
        "saved_share": round(share, 3),
        "saved_for_good": on.superseded + on.reused,
        "deferred_by_cap": on.held,
    }


def main() -> None:
    """`python bench/credits.py [--quick] [--imports N] [--edited K] [--saves S] ...`."""
    emit_result("credits", anyio.run(run, parse_args()))


if __name__ == "__main__":
    main()
