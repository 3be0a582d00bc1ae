"""Durable intake: signed Shopify webhooks against the real intake vs a handler that stores nothing.

The client runs in its own process (spawned), so on 2 cores its CPU does not come out of the
server's event loop. Both servers run in this process, one after the other, on the same
loopback, with the same client, body sizes and concurrency:

  baseline    POST /hooks/{source} reads the body and answers 202; nothing verified or stored.
  studiohook  webhook_routes + StoreIntake + SQLiteStore (WAL, synchronous=FULL, group commit),
              the shipped config.toml (Shopify source, HMAC verified, `new-product` route, so
              every delivery commits an inbox row and a job before its 202).

Each side gets a warm-up (not timed) before N timed deliveries.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from _shared import (
    SHOPIFY_SOURCE,
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

from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.model import JobState
from service.store.sqlite import SQLiteStore

FULL_N, FULL_C = 5000, 64
QUICK_N, QUICK_C = 1000, 32
WARMUP_FRACTION = 10
CLIENT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ClientPlan:
    """What the client process sends: to where, how many, how many at once."""

    url: str
    count: int
    concurrency: int
    warmup: int
    secret: str
    first_index: int


@dataclass(frozen=True, slots=True)
class Measured:
    """One side's figures, as the client saw them plus the server's CPU time."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int]
    server_cpu_ms_per_request: float
    commits: int = 0
    writes: int = 0


# --- the client process ---------------------------------------------------------------------


def client_main(plan: ClientPlan, conn: Connection) -> None:
    """Entry point of the spawned client: warm up, report, wait for "go", run, report."""
    asyncio.run(_client(plan, conn))


async def _client(plan: ClientPlan, conn: Connection) -> None:
    total = plan.warmup + plan.count
    deliveries = [shopify_delivery(plan.first_index + i, plan.secret) for i in range(total)]
    connector = aiohttp.TCPConnector(limit=plan.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _send_all(session, plan, deliveries[: plan.warmup])
        conn.send("warm")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        started = time.perf_counter()
        latencies, statuses = await _send_all(session, plan, deliveries[plan.warmup :])
        elapsed = time.perf_counter() - started
    conn.send({"elapsed": elapsed, "latencies": latencies, "statuses": statuses})


async def _send_all(
    session: aiohttp.ClientSession, plan: ClientPlan, deliveries: list[Any]
) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    pending = iter(deliveries)

    async def worker() -> None:
        for delivery in pending:
            started = time.perf_counter()
            async with session.post(plan.url, data=delivery.body, headers=delivery.headers) as r:
                await r.read()
            latencies.append(time.perf_counter() - started)
            statuses[r.status] = statuses.get(r.status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    return latencies, statuses


# --- the server side ------------------------------------------------------------------------


async def _bare_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True}, status=202)


async def _serve_and_measure(
    routes: list[web.RouteDef], plan_for: Any, store: SQLiteStore | None = None
) -> Measured:
    app = web.Application(client_max_size=1024 * 1024 + 1)
    app.add_routes(routes)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    plan: ClientPlan = plan_for(f"http://127.0.0.1:{port}/hooks/{SHOPIFY_SOURCE}")
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    client = context.Process(target=client_main, args=(plan, theirs), daemon=True)
    client.start()
    try:
        with anyio.fail_after(CLIENT_TIMEOUT_S):
            await _receive(ours)  # "warm"
            commits0 = store.commit_count if store else 0
            writes0 = store.write_count if store else 0
            cpu0 = time.process_time()
            ours.send("go")
            result: dict[str, Any] = await _receive(ours)
            cpu = time.process_time() - cpu0
    finally:
        await runner.cleanup()
        client.join(timeout=10)
        if client.is_alive():
            client.terminate()
    latencies = result["latencies"]
    return Measured(
        requests_per_s=plan.count / result["elapsed"],
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=max(latencies) * 1000,
        statuses=result["statuses"],
        server_cpu_ms_per_request=cpu * 1000 / plan.count,
        commits=(store.commit_count - commits0) if store else 0,
        writes=(store.write_count - writes0) if store else 0,
    )


async def _receive(conn: Connection) -> Any:
    """Wait for the client without blocking the server loop."""
    while not conn.poll():
        await anyio.sleep(0.01)
    return conn.recv()


async def run(count: int, concurrency: int) -> dict[str, Any]:
    """Baseline first, then studiohook, each with its own warm-up."""
    warmup = max(count // WARMUP_FRACTION, concurrency)
    secret = secrets.token_hex(16)

    def plan_for(first_index: int) -> Any:
        return lambda url: ClientPlan(url, count, concurrency, warmup, secret, first_index)

    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        state = Path(tmp) / "state"
        cfg = shipped_config(state, secret)
        configure_bench_logging(Path(tmp) / "service.log")
        catalog = await shipped_catalog(cfg)
        say(f"baseline: bare aiohttp handler, {count} timed requests, {concurrency} connections")
        baseline = await _serve_and_measure(
            [web.post("/hooks/{source}", _bare_handler)], plan_for(0)
        )
        say("studiohook: webhook_routes + StoreIntake + SQLiteStore (group commit)")
        store = SQLiteStore(state / "studiohook.db")
        await store.open()
        try:
            intake = StoreIntake(store, catalog)
            routes = webhook_routes(
                sources={s.name: s for s in cfg.sources},
                intake=intake,
                max_body_bytes=cfg.http.max_body_bytes,
                body_timeout_s=cfg.http.body_timeout_s,
            )
            ours = await _serve_and_measure(routes, plan_for(count + warmup), store)
            stored = (await store.count_jobs_by_state())[JobState.RECEIVED]
        finally:
            await store.close()
    return _report(count, concurrency, warmup=warmup, baseline=baseline, ours=ours, stored=stored)


def _report(
    count: int, concurrency: int, *, warmup: int, baseline: Measured, ours: Measured, stored: int
) -> dict[str, Any]:
    rows = [
        ("requests/s", ours.requests_per_s, baseline.requests_per_s),
        ("latency p50 (ms)", ours.p50_ms, baseline.p50_ms),
        ("latency p99 (ms)", ours.p99_ms, baseline.p99_ms),
        ("latency max (ms)", ours.max_ms, baseline.max_ms),
        (
            "server CPU per request (ms)",
            ours.server_cpu_ms_per_request,
            baseline.server_cpu_ms_per_request,
        ),
    ]
    print_table(
        f"intake: {count} signed Shopify webhooks, {concurrency} connections "
        f"(+{warmup} warm-up each)",
        ["figure", "studiohook", "baseline", "ratio"],
        [(name, a, b, ratio(a, b)) for name, a, b in rows],
    )
    batching = ratio(ours.writes, ours.commits)
    print_table(
        "studiohook store during the timed run",
        ["figure", "value"],
        [
            ("write requests", ours.writes),
            ("transactions committed (fsyncs)", ours.commits),
            ("writes per commit (batching factor)", batching),
            ("jobs stored (received, warm-up included)", stored),
            ("HTTP statuses", _statuses(ours.statuses)),
            ("baseline HTTP statuses", _statuses(baseline.statuses)),
        ],
    )
    return {
        "requests": count,
        "connections": concurrency,
        "studiohook_rps": round(ours.requests_per_s, 1),
        "baseline_rps": round(baseline.requests_per_s, 1),
        "rps_ratio": round(ratio(ours.requests_per_s, baseline.requests_per_s), 3),
        "studiohook_p50_ms": round(ours.p50_ms, 2),
        "studiohook_p99_ms": round(ours.p99_ms, 2),
        "baseline_p50_ms": round(baseline.p50_ms, 2),
        "baseline_p99_ms": round(baseline.p99_ms, 2),
        "p99_ratio": round(ratio(ours.p99_ms, baseline.p99_ms), 3),
        "commit_count": ours.commits,
        "write_count": ours.writes,
        "batching_factor": round(batching, 2),
        "studiohook_statuses": ours.statuses,
        "jobs_stored": stored,
    }


def _statuses(statuses: dict[int, int]) -> str:
    return " ".join(f"{code}x{n}" for code, n in sorted(statuses.items()))


def main() -> None:
    """`python bench/intake.py [--quick]`."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "intake bench")
    count, concurrency = (QUICK_N, QUICK_C) if args.quick else (FULL_N, FULL_C)
    figures = anyio.run(run, count, concurrency)
    emit_result("intake", figures)


if __name__ == "__main__":
    main()
