"""Burst: N events at once to all `ready`, default pacing, against the tutorial's own loop.

  studiohook  JobPipeline (preparer with the shipped config's template and route, the default
              two-step export, default request pacing and poll timing, a fresh state with
              nothing learned yet) on a SQLiteStore, the real client and the simulator over
              loopback; N `received` jobs committed by the real intake; the clock starts when
              the pipeline starts and stops at the last `ready` commit.
  baseline    the tutorial's loop in the same run on the same simulator, one per event, all
              at once: create-and-export (one call), then read the progress right away and
              every 3 s until it is done.

Renders last R +- 20 % (the simulator's `render_jitter`), so "the slowest render" is a real
figure: the target is a makespan within 1.15 x the slowest render. The simulator runs in its own process so its CPU is not the daemon's.
Both sides run on the daemon's event loop (uvloop where installed, as `studiohook serve`).

Then the same burst once more, on a fresh store, while the simulator answers 429 with a
Retry-After of 1 s to the next 5 requests, twice (at the start and 0.75 R later; a window a 429 answered inside another extends it). From the
simulator's request log (`GET /_simulator/requests`: every request and every 429 with its
Retry-After) and the moment the client saw each first 429 and sent each request (same wall
clock), each Retry-After window is checked: no more than one request may be sent inside it.
Requests sent before the client saw the 429 but handled by the simulator after it are counted
apart ("on the wire"): the simulator stamps a request when it handles it, not when it was sent.
"""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
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
from service.eventloop import loop_options, tune_collector
from service.intake import StoreIntake
from service.jobs.ratelimit import RequestGate
from service.model import Job, JobState

FULL = (200, 256, 2.0)
QUICK = (50, 256, 1.0)
JITTER = 0.2
TUTORIAL_POLL_S = 3.0
THROTTLE_NEXT = 5
THROTTLE_RETRY_AFTER_S = 1.0
THROTTLE_TIMES = 2
API_KEY = "bench-key"


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """What one side measured."""

    makespan_s: float
    requests: int
    polls_per_job: float
    timeline: tuple[tuple[str, float, float], ...] = ()
    """Per state: the first and the last commit into it, seconds after the start."""
    submitted_at: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per job: its `submitted` commit, seconds after the start."""


async def _studiohook(
    cfg: Config,
    url: str,
    count: int,
    secret: str,
    *,
    db_name: str = "studiohook.db",
    on_call: Callable[[str, str], None] | None = None,
    on_send: Callable[[str], None] | None = None,
    meanwhile: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Run, list[Job]]:
    state = cfg.service.state_dir
    store = WatchedStore(state / db_name, expected=count)
    await store.open()
    try:
        catalog = await shipped_catalog(cfg)
        source = shopify_source(cfg)
        say(f"seeding {count} events through the intake ...")
        await seed_events(StoreIntake(store, catalog), source, count, secret)
        async with real_pipeline(
            cfg, store, catalog, url, API_KEY, on_call=on_call, on_send=on_send
        ) as (
            pipeline,
            calls,
        ):
            say("studiohook: pipeline started, waiting for every job to be ready ...")
            async with anyio.create_task_group() as tg:
                started = time.time()
                if meanwhile is not None:
                    tg.start_soon(meanwhile)
                await tg.start(pipeline.run)
                with anyio.fail_after(120):
                    await store.all_ready.wait()
                tg.cancel_scope.cancel()
        makespan = max(store.ready_committed_at.values()) - started
        jobs = [
            job
            for job in await store.jobs_in_states({JobState.READY}, limit=10 * count)
            if job.job_id in store.ready_committed_at
        ]
    finally:
        await store.close()
    polls = sum(job.polls for job in jobs) / len(jobs)
    timeline, submitted_at = _timeline(state / db_name, started)
    return Run(makespan, calls[0], polls, timeline, submitted_at), jobs


def _timeline(
    db_path: Path, started: float
) -> tuple[tuple[tuple[str, float, float], ...], dict[str, float]]:
    """Where the time went: each state's first and last commit, and each job's `submitted`."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT to_state, MIN(at), MAX(at) FROM transitions WHERE at >= ?"
            " GROUP BY to_state ORDER BY MIN(at)",
            (started,),
        ).fetchall()
        submitted = db.execute(
            "SELECT job_id, MAX(at) FROM transitions WHERE to_state = 'submitted' GROUP BY job_id"
        ).fetchall()
    timeline = tuple((str(state), first - started, last - started) for state, first, last in rows)
    return timeline, {str(job): at - started for job, at in submitted}


def _renders_done_s(run: Run, jobs: list[Job], state: dict[str, Any]) -> float:
    """When the last render finished: each job's `submitted` commit plus its render length."""
    lengths = {p["name"]: p["render_seconds"] for p in state["projects"]}
    ends = [
        run.submitted_at[j.job_id] + lengths[j.export_name]
        for j in jobs
        if j.job_id in run.submitted_at and j.export_name in lengths
    ]
    return max(ends, default=float("nan"))


async def _tutorial(url: str, bodies: list[dict[str, Any]]) -> Run:
    gate = RequestGate(1e6, time.monotonic)
    calls = [0]
    polls = [0]

    def count_call(_endpoint: str, _outcome: str) -> None:
        calls[0] += 1

    finished: list[float] = []
    async with AIStudiosClient(
        base_url=url, legacy_base_url=url, api_key=API_KEY, before_request=gate, on_call=count_call
    ) as client:

        async def loop(index: int, body: dict[str, Any]) -> None:
            project_id = await client.export_v3(body, name=f"tutorial-{index}")
            while True:
                polls[0] += 1
                if (await client.progress_v3(project_id)).done:
                    break
                await anyio.sleep(TUTORIAL_POLL_S)
            finished.append(time.time())

        started = time.time()
        async with anyio.create_task_group() as tg:
            for index, body in enumerate(bodies):
                tg.start_soon(loop, index, body)
    return Run(max(finished) - started, calls[0], polls[0] / len(bodies))


async def _simulator_state(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_simulator/state") as r:
        state: dict[str, Any] = orjson.loads(await r.read())
        return state


def _slowest_render_s(state: dict[str, Any], names: set[str]) -> float:
    lengths = [p["render_seconds"] for p in state["projects"] if p["name"] in names]
    return max(lengths) if lengths else float("nan")


async def _simulator_post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{url}{path}", json=body) as r:
        answer: dict[str, Any] = orjson.loads(await r.read())
        return answer


async def _simulator_get(url: str, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}{path}") as r:
        answer: dict[str, Any] = orjson.loads(await r.read())
        return answer


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    """One Retry-After window, merged over the 429s that overlap it, on the shared wall clock.

    `answered_at` is the simulator's first 429, `seen_at` the moment the client reported it
    (no request may leave after that), `ends_at` the last Retry-After's end.
    """

    answered_at: float
    seen_at: float
    ends_at: float
    throttled: int
    on_the_wire: int
    """Requests the client sent before it saw the first 429 that reached the simulator after
    it answered that 429 (its log stamps a request when it handles it)."""
    inside: int
    """Requests the client sent after it saw the 429 and before the window ended."""
    arrived_inside: int
    """Requests the simulator handled after the client saw the 429, inside the window."""


def retry_after_windows(
    throttles: list[tuple[float, float]],
    seen: list[float],
    sent: list[float],
    arrivals: list[float],
) -> list[Window]:
    """The simulator's 429s grouped into windows, with the requests sent inside each."""
    merged: list[list[float]] = []  # [first 429, window end, 429 count]
    for at, retry_after in sorted(throttles):
        if merged and at < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], at + retry_after)
            merged[-1][2] += 1
        else:
            merged.append([at, at + retry_after, 1])
    windows = []
    for first, end, throttled in merged:
        seen_at = min((t for t in seen if t >= first), default=first)
        windows.append(
            Window(
                answered_at=first,
                seen_at=seen_at,
                ends_at=end,
                throttled=int(throttled),
                on_the_wire=sum(1 for t in arrivals if t > first)
                - sum(1 for t in sent if t >= seen_at),
                inside=sum(1 for t in sent if seen_at <= t < end),
                arrived_inside=sum(1 for t in arrivals if seen_at <= t < end),
            )
        )
    return windows


async def _throttled(
    cfg: Config, url: str, count: int, secret: str, render_s: float
) -> tuple[Run, list[Window]]:
    """The burst again, on a fresh store, while the simulator answers 429 + Retry-After."""
    seen: list[float] = []
    sent: list[float] = []
    first_request = len((await _simulator_get(url, "/_simulator/requests"))["requests"])

    def on_call(_endpoint: str, outcome: str) -> None:
        if outcome == "retryable":  # a 429 here: no 5xx or refused connection is injected
            seen.append(time.time())

    async def throttle() -> None:
        for _ in range(THROTTLE_TIMES):
            await _simulator_post(
                url,
                "/_simulator/knobs",
                {"throttle_next": THROTTLE_NEXT, "retry_after_s": THROTTLE_RETRY_AFTER_S},
            )
            await anyio.sleep(render_s * 0.75)

    run, _ = await _studiohook(
        cfg,
        url,
        count,
        secret,
        db_name="throttled.db",
        on_call=on_call,
        on_send=lambda _endpoint: sent.append(time.time()),
        meanwhile=throttle,
    )
    log = await _simulator_get(url, "/_simulator/requests")
    arrivals = [float(at) for at, _, _ in log["requests"][first_request:]]
    throttles = [(float(at), float(ra)) for at, ra in log["throttles"]]
    return run, retry_after_windows(throttles, seen, sent, arrivals)


def _print_windows(windows: list[Window], run: Run, render_s: float) -> None:
    rows = [
        (
            f"{w.throttled} x 429, {w.ends_at - w.answered_at:.2f} s",
            w.on_the_wire,
            w.inside,
            w.arrived_inside,
            round(1000 * (w.seen_at - w.answered_at), 1),
        )
        for w in windows
    ]
    print_table(
        f"the same burst while the simulator answers {THROTTLE_NEXT} requests with 429 + "
        f"Retry-After {THROTTLE_RETRY_AFTER_S:g} s, {THROTTLE_TIMES} times "
        f"{render_s * 0.75:g} s apart: requests in each Retry-After window (simulator's log)",
        [
            "window",
            "on the wire at the 429",
            "sent inside (target <= 1)",
            "handled inside",
            "429 -> client (ms)",
        ],
        rows,
    )
    worst = max((w.inside for w in windows), default=0)
    verdict = "OK" if windows and worst <= 1 else "MISSED"
    print(
        f"{verdict}: at most {worst} request(s) inside any Retry-After window; that burst's "
        f"last ready came {run.makespan_s:.2f} s after the start, {run.requests} API requests"
    )


async def run(count: int, concurrency: int, render_s: float) -> dict[str, Any]:
    """Studiohook (cold: nothing learned), then the tutorial loop, on one simulator."""
    secret = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        cfg = shipped_config(Path(tmp) / "state", secret)
        cfg = dataclasses.replace(
            cfg,
            aistudios=dataclasses.replace(
                cfg.aistudios,
                max_concurrent_exports=concurrency,
                simulator=dataclasses.replace(cfg.aistudios.simulator, render_seconds=render_s),
            ),
        )
        configure_bench_logging(Path(tmp) / "service.log")
        knobs = SimulatorKnobs(render_seconds=render_s, render_jitter=JITTER)
        with simulator_process(knobs, Path(tmp) / "simulator.log") as url:
            cold, jobs = await _studiohook(cfg, url, count, secret)
            state = await _simulator_state(url)
            cold_slowest = _slowest_render_s(state, {j.export_name for j in jobs})
            renders_done = _renders_done_s(cold, jobs, state)
            billed = sum(state["billed_by_name"].get(j.export_name, 0) for j in jobs)
            bodies = [orjson.loads(job.export_body or b"{}") for job in jobs]
            say(f"baseline: the tutorial loop, {len(bodies)} at once ...")
            tutorial = await _tutorial(url, bodies)
            state = await _simulator_state(url)
            tutorial_slowest = _slowest_render_s(
                state, {f"tutorial-{i}" for i in range(len(bodies))}
            )
            say("studiohook again, fresh store, while the simulator throttles ...")
            throttled, windows = await _throttled(cfg, url, count, secret, render_s)
    rows = [
        ("time to the last ready (s)", cold.makespan_s, tutorial.makespan_s,
         ratio(cold.makespan_s, tutorial.makespan_s)),
        ("slowest render in that run (s)", cold_slowest, tutorial_slowest, "-"),
        ("time / slowest render", ratio(cold.makespan_s, cold_slowest),
         ratio(tutorial.makespan_s, tutorial_slowest), "-"),
        ("progress polls per job (mean)", cold.polls_per_job, tutorial.polls_per_job,
         ratio(cold.polls_per_job, tutorial.polls_per_job)),
        ("API requests", cold.requests, tutorial.requests, ratio(cold.requests, tutorial.requests)),
        ("exports billed", billed, len(bodies), "-"),
    ]  # fmt: skip
    print_table(
        f"burst: {count} events at once, renders {render_s:g} s +- {JITTER:.0%}, "
        f"{concurrency} concurrent exports, default pacing and poll timing, nothing learned yet",
        ["figure", "studiohook", "tutorial loop (3 s)", "ratio"],
        rows,
    )
    print_table(
        "studiohook's burst, where the time went: each state's first and last commit (s)",
        ["state", "first", "last"],
        [
            *cold.timeline,
            ("last render finished (its submit + its length)", renders_done, "-"),
            ("last ready - last render finished", cold.makespan_s - renders_done, "-"),
        ],
    )
    _print_windows(windows, throttled, render_s)
    return {
        "renders_done_s": round(renders_done, 3),
        "timeline": [(state, round(a, 3), round(b, 3)) for state, a, b in cold.timeline],
        "throttle_windows": len(windows),
        "throttle_worst_inside": max((w.inside for w in windows), default=0),
        "throttle_on_the_wire": [w.on_the_wire for w in windows],
        "throttled_makespan_s": round(throttled.makespan_s, 3),
        "events": count,
        "render_s": render_s,
        "studiohook_s": round(cold.makespan_s, 3),
        "studiohook_slowest_render_s": round(cold_slowest, 3),
        "studiohook_vs_slowest": round(ratio(cold.makespan_s, cold_slowest), 3),
        "studiohook_polls_per_job": round(cold.polls_per_job, 2),
        "tutorial_s": round(tutorial.makespan_s, 3),
        "tutorial_polls_per_job": round(tutorial.polls_per_job, 2),
        "studiohook_requests": cold.requests,
        "tutorial_requests": tutorial.requests,
        "exports_billed": billed,
    }


def main() -> None:
    """`python bench/burst.py [--quick]`."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "burst bench")
    count, concurrency, render_s = QUICK if args.quick else FULL
    options, _ = loop_options(prefer_uvloop=True)
    tune_collector()  # as `studiohook serve` does
    emit_result(
        "burst",
        anyio.run(run, count, concurrency, render_s, backend="asyncio", backend_options=options),
    )


if __name__ == "__main__":
    main()
