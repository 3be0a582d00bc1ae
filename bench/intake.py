"""Durable webhook intake under wrk load, beside a bare aiohttp handler measured in the same run.

The load generator is `wrk` (Debian package `wrk`), one thread, C keep-alive connections, a Lua
script that gives every request its own `X-Shopify-Webhook-Id` (so every delivery is a new
event) on the signed `examples/shopify-product-create.json` body. wrk is a separate C process:
on 2 cores it takes one, the server gets the other (its writer thread included). Both servers
run in this process, one after the other, on the same loopback and event loop:

  baseline    POST /hooks/{source} reads the body and answers 202; nothing verified or stored.
  studiohook  webhook_routes + StoreIntake + SQLiteStore (WAL, synchronous=FULL, group commit),
              the shipped config.toml (Shopify source, HMAC verified, `new-product` route, so
              every delivery commits an inbox row and a job before its 202).

Each side gets a warm-up run (not counted) before the timed run of D seconds.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from _shared import (
    ROOT,
    SHOPIFY_SOURCE,
    configure_bench_logging,
    emit_result,
    print_table,
    ratio,
    say,
    shipped_catalog,
    shipped_config,
)
from aiohttp import web

from service.eventloop import loop_options, tune_collector
from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.model import JobState
from service.store.sqlite import SQLiteStore

FULL_S, QUICK_S = 10.0, 3.0
WARMUP_S = 2.0
CONNECTIONS = 32
_BODY = ROOT / "examples" / "shopify-product-create.json"
_HEADERS = ROOT / "examples" / "shopify-product-create.headers.json"

# Each wrk thread numbers its requests; the prefix (run tag + thread) keeps ids unique across
# the warm-up, the timed run and both servers. `done` prints one machine-readable line.
_LUA = r"""
local body = [==[%(body)s]==]
local base_headers = %(headers)s
local next_thread = 1
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
function init(args)
  prefix = args[1] .. "-" .. tid .. "-"
  counter = 0
  hdrs = {}
  for k, v in pairs(base_headers) do hdrs[k] = v end
end
function request()
  counter = counter + 1
  hdrs["X-Shopify-Webhook-Id"] = prefix .. counter
  return wrk.format("POST", nil, hdrs, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d,'
    .. ' "max_us": %%d, "non_2xx": %%d, "socket_errors": %%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True, slots=True)
class Measured:
    """One side's figures: wrk's view plus the server's CPU time and store counters."""

    requests: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_ms_per_request: float
    commits: int = 0
    writes: int = 0


def write_lua(path: Path, secret: str) -> None:
    """The wrk script: the example body signed once, a fresh webhook id per request."""
    body = _BODY.read_bytes()
    headers: dict[str, str] = orjson.loads(_HEADERS.read_bytes())
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    headers["X-Shopify-Hmac-Sha256"] = base64.b64encode(digest).decode()
    lua_headers = "{" + ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items()) + "}"
    path.write_text(_LUA % {"body": body.decode(), "headers": lua_headers}, encoding="utf-8")


async def run_wrk(
    script: Path, url: str, *, seconds: float, connections: int, tag: str
) -> dict[str, Any]:
    """Run wrk once; return the figures its `done` printed."""
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
        "-s", str(script), url, "--", tag,
    ]  # fmt: skip
    result = await anyio.run_process(command, check=True)
    for line in result.stdout.decode().splitlines():
        if line.startswith("WRK "):
            figures: dict[str, Any] = orjson.loads(line[4:])
            return figures
    raise RuntimeError(f"wrk printed no figures:\n{result.stdout.decode()}")


async def _bare_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True}, status=202)


async def _serve_and_measure(
    routes: list[web.RouteDef],
    *,
    script: Path,
    seconds: float,
    connections: int,
    tag: str,
    store: SQLiteStore | None = None,
) -> Measured:
    app = web.Application(client_max_size=1024 * 1024 + 1)
    app.add_routes(routes)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/hooks/{SHOPIFY_SOURCE}"
    try:
        warm_seconds = min(WARMUP_S, seconds)
        await run_wrk(script, url, seconds=warm_seconds, connections=connections, tag=f"{tag}w")
        commits0 = store.commit_count if store else 0
        writes0 = store.write_count if store else 0
        cpu0 = time.process_time()
        figures = await run_wrk(script, url, seconds=seconds, connections=connections, tag=tag)
        cpu = time.process_time() - cpu0
    finally:
        await runner.cleanup()
    count = int(figures["requests"])
    return Measured(
        requests=count,
        requests_per_s=count / (figures["duration_us"] / 1e6),
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        non_2xx=int(figures["non_2xx"]),
        socket_errors=int(figures["socket_errors"]),
        server_cpu_ms_per_request=cpu * 1000 / max(count, 1),
        commits=(store.commit_count - commits0) if store else 0,
        writes=(store.write_count - writes0) if store else 0,
    )


async def run(seconds: float, connections: int, loop_name: str) -> dict[str, Any]:
    """Baseline first, then studiohook, each with its own warm-up."""
    secret = secrets.token_hex(16)
    run_tag = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        state = Path(tmp) / "state"
        script = Path(tmp) / "shopify.lua"
        write_lua(script, secret)
        cfg = shipped_config(state, secret)
        configure_bench_logging(Path(tmp) / "service.log")
        catalog = await shipped_catalog(cfg)
        say(f"event loop: {loop_name}; wrk -t1 -c{connections} -d{seconds:g}s each side")
        say("baseline: bare aiohttp handler that reads the body and answers 202")
        baseline = await _serve_and_measure(
            [web.post("/hooks/{source}", _bare_handler)],
            script=script,
            seconds=seconds,
            connections=connections,
            tag=f"{run_tag}b",
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
            ours = await _serve_and_measure(
                routes,
                script=script,
                seconds=seconds,
                connections=connections,
                tag=f"{run_tag}s",
                store=store,
            )
            stored = (await store.count_jobs_by_state())[JobState.RECEIVED]
        finally:
            await store.close()
    return _report(seconds, connections, loop_name, baseline=baseline, ours=ours, stored=stored)


def _report(
    seconds: float,
    connections: int,
    loop_name: str,
    *,
    baseline: Measured,
    ours: Measured,
    stored: int,
) -> dict[str, Any]:
    rows: list[tuple[str, float, float]] = [
        ("requests/s", ours.requests_per_s, baseline.requests_per_s),
        ("latency p50 (ms)", ours.p50_ms, baseline.p50_ms),
        ("latency p90 (ms)", ours.p90_ms, baseline.p90_ms),
        ("latency p99 (ms)", ours.p99_ms, baseline.p99_ms),
        ("latency max (ms)", ours.max_ms, baseline.max_ms),
        (
            "server CPU per request (ms)",
            ours.server_cpu_ms_per_request,
            baseline.server_cpu_ms_per_request,
        ),
    ]
    print_table(
        f"intake: signed Shopify webhooks, wrk -t1 -c{connections} -d{seconds:g}s, "
        f"event loop {loop_name}",
        ["figure", "studiohook", "baseline", "ratio"],
        [(name, a, b, ratio(a, b)) for name, a, b in rows],
    )
    batching = ratio(ours.writes, ours.commits)
    print_table(
        "studiohook during the timed run",
        ["figure", "value"],
        [
            ("requests answered (timed run)", ours.requests),
            ("non-2xx answers / socket errors", f"{ours.non_2xx} / {ours.socket_errors}"),
            ("baseline non-2xx / socket errors", f"{baseline.non_2xx} / {baseline.socket_errors}"),
            ("write requests", ours.writes),
            ("transactions committed (fsyncs)", ours.commits),
            ("writes per commit (batching factor)", batching),
            ("jobs stored (warm-up included)", stored),
        ],
    )
    return {
        "loop": loop_name,
        "seconds": seconds,
        "connections": connections,
        "studiohook_requests": ours.requests,
        "studiohook_rps": round(ours.requests_per_s, 1),
        "baseline_rps": round(baseline.requests_per_s, 1),
        "rps_ratio": round(ratio(ours.requests_per_s, baseline.requests_per_s), 3),
        "studiohook_p50_ms": round(ours.p50_ms, 2),
        "studiohook_p99_ms": round(ours.p99_ms, 2),
        "baseline_p50_ms": round(baseline.p50_ms, 2),
        "baseline_p99_ms": round(baseline.p99_ms, 2),
        "studiohook_cpu_ms": round(ours.server_cpu_ms_per_request, 3),
        "baseline_cpu_ms": round(baseline.server_cpu_ms_per_request, 3),
        "studiohook_non_2xx": ours.non_2xx,
        "studiohook_socket_errors": ours.socket_errors,
        "commit_count": ours.commits,
        "write_count": ours.writes,
        "batching_factor": round(batching, 2),
        "jobs_stored": stored,
    }


def parse_args() -> argparse.Namespace:
    """`--quick`, the connection count and the event loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_S:g} s per side, not {FULL_S:g} s"
    )
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument(
        "--loop",
        choices=["default", "asyncio"],
        default="default",
        help="default: what the daemon uses (uvloop when installed); asyncio: the standard loop",
    )
    return parser.parse_args()


def main() -> None:
    """`python bench/intake.py [--quick] [--connections C] [--loop asyncio]`."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench/intake.py needs wrk on the PATH (Debian: apt-get install wrk)")
    args = parse_args()
    seconds = QUICK_S if args.quick else FULL_S
    options, loop_name = loop_options(prefer_uvloop=args.loop == "default")
    tune_collector()  # as `studiohook serve` does
    figures = anyio.run(run, seconds, args.connections, loop_name, backend_options=options)
    emit_result("intake", figures)


if __name__ == "__main__":
    main()
