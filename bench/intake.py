"""Durable webhook intake under wrk load, beside a bare aiohttp handler measured in the same run.

The load generator is `wrk` (Debian package `wrk`), one thread, C keep-alive connections, a Lua
script that gives every request its own `X-Shopify-Webhook-Id` (so every delivery is a new
event) on the signed `examples/shopify-product-create.json` body. wrk is a separate C process:
on 2 cores it takes one, the server gets the other (its writer thread included). Both servers
run in this process, on the same loopback and event loop, and take turns:

  baseline    POST /hooks/{source} reads the body and answers 202; nothing verified or stored.
  studiohook  webhook_routes + StoreIntake + SQLiteStore (WAL, synchronous=FULL, group commit),
              the shipped config.toml (Shopify source, HMAC verified, `new-product` route, so
              every delivery commits an inbox row and a job before its 202).

Each side gets a warm-up run (not counted), then the timed D seconds of each side are cut into
slices of 2 s (1 s with --quick) that alternate, baseline first in one pair and second in the
next. On a shared virtual machine whose speed drifts from one moment to the next, both sides
are then measured through the same moments; one side's 10 s after the other's was not (single
ratios from that way moved between 0.18 and 0.36 in one hour). Rates are each side's requests
over its slices' summed durations; latency percentiles come from wrk's histograms of all of a
side's slices, merged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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
SLICE_S, QUICK_SLICE_S = 2.0, 1.0
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
  local histogram = {}
  for i = 1, #latency do
    local value, count = latency(i)
    histogram[i] = string.format("[%%d, %%d]", value, count)
  end
  io.write(string.format(
    'WRK {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d,'
    .. ' "max_us": %%d, "non_2xx": %%d, "socket_errors": %%d, "latency_us": [%%s]}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout,
    table.concat(histogram, ", ")))
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
    thread_cpu_ms_per_request: dict[str, float] = field(default_factory=dict)


@dataclass
class _Side:
    """One server's slices, added up as they come."""

    url: str
    store: SQLiteStore | None = None
    requests: int = 0
    duration_us: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_s: float = 0.0
    thread_cpu_s: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    writes: int = 0
    latency_us: Counter[int] = field(default_factory=Counter)

    def add(
        self,
        figures: dict[str, Any],
        cpu_s: float,
        commits: int,
        writes: int,
        thread_cpu_s: dict[str, float],
    ) -> None:
        self.requests += int(figures["requests"])
        self.duration_us += int(figures["duration_us"])
        self.non_2xx += int(figures["non_2xx"])
        self.socket_errors += int(figures["socket_errors"])
        self.latency_us.update({int(v): int(n) for v, n in figures["latency_us"]})
        self.cpu_s += cpu_s
        self.thread_cpu_s.update(thread_cpu_s)
        self.commits += commits
        self.writes += writes

    def measured(self) -> Measured:
        return Measured(
            requests=self.requests,
            requests_per_s=self.requests / (self.duration_us / 1e6),
            p50_ms=_percentile_us(self.latency_us, 50) / 1000,
            p90_ms=_percentile_us(self.latency_us, 90) / 1000,
            p99_ms=_percentile_us(self.latency_us, 99) / 1000,
            max_ms=max(self.latency_us, default=0) / 1000,
            non_2xx=self.non_2xx,
            socket_errors=self.socket_errors,
            server_cpu_ms_per_request=self.cpu_s * 1000 / max(self.requests, 1),
            commits=self.commits,
            writes=self.writes,
            thread_cpu_ms_per_request={
                name: cpu * 1000 / max(self.requests, 1) for name, cpu in self.thread_cpu_s.items()
            },
        )


def _percentile_us(histogram: Counter[int], pct: float) -> float:
    """The smallest latency that at least `pct` % of the requests did not exceed."""
    total = sum(histogram.values())
    wanted, seen = total * pct / 100, 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= wanted:
            return value
    return 0.0


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


@asynccontextmanager
async def _serving(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    """Serve `routes` on a free loopback port; yield the webhook URL."""
    app = web.Application(client_max_size=1024 * 1024 + 1)
    app.add_routes(routes)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/{SHOPIFY_SOURCE}"
    finally:
        await runner.cleanup()


async def _measure_slice(
    side: _Side, *, script: Path, seconds: float, connections: int, tag: str
) -> None:
    store = side.store
    commits0 = store.commit_count if store else 0
    writes0 = store.write_count if store else 0
    threads0 = _thread_cpu_s()
    cpu0 = time.process_time()
    figures = await run_wrk(script, side.url, seconds=seconds, connections=connections, tag=tag)
    cpu = time.process_time() - cpu0
    threads = _thread_cpu_s()
    side.add(
        figures,
        cpu,
        (store.commit_count - commits0) if store else 0,
        (store.write_count - writes0) if store else 0,
        {name: threads[name] - threads0.get(name, 0.0) for name in threads},
    )


_THREAD_NAMES = {
    "MainThread": "event loop",
    "store-writer": "writer",
    "store-checkpointer": "checkpointer",
}


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of the event loop, the store's writer and its checkpointer."""
    seconds: dict[str, float] = {}
    for thread in threading.enumerate():
        name = _THREAD_NAMES.get(thread.name)
        if name is not None and thread.ident is not None:
            clock = time.pthread_getcpuclockid(thread.ident)
            seconds[name] = time.clock_gettime(clock)
    return seconds


async def _alternate(
    baseline: _Side, ours: _Side, *, script: Path, seconds: float, connections: int, tag: str
) -> None:
    """Warm both up, then the timed slices: B S, S B, B S, ... (see the module's docstring)."""
    for name, side in (("b", baseline), ("s", ours)):
        warm = min(WARMUP_S, seconds)
        await run_wrk(script, side.url, seconds=warm, connections=connections, tag=f"{tag}{name}w")
    slices = _slice_count(seconds)
    for index in range(slices):
        pair = [("b", baseline), ("s", ours)]
        for name, side in pair if index % 2 == 0 else reversed(pair):
            await _measure_slice(
                side,
                script=script,
                seconds=seconds / slices,
                connections=connections,
                tag=f"{tag}{name}{index}",
            )


def _slice_count(seconds: float) -> int:
    return max(1, round(seconds / (SLICE_S if seconds >= FULL_S else QUICK_SLICE_S)))


async def run(seconds: float, connections: int, loop_name: str) -> dict[str, Any]:
    """Both servers up at once, measured in alternating slices."""
    secret = secrets.token_hex(16)
    run_tag = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        state = Path(tmp) / "state"
        script = Path(tmp) / "shopify.lua"
        write_lua(script, secret)
        cfg = shipped_config(state, secret)
        configure_bench_logging(Path(tmp) / "service.log")
        catalog = await shipped_catalog(cfg)
        say(f"event loop: {loop_name}; wrk -t1 -c{connections}, {seconds:g} s each side in slices")
        say("baseline: bare aiohttp handler that reads the body and answers 202")
        say("studiohook: webhook_routes + StoreIntake + SQLiteStore (group commit)")
        store = SQLiteStore(state / "studiohook.db")
        await store.open()
        try:
            routes = webhook_routes(
                sources={s.name: s for s in cfg.sources},
                intake=StoreIntake(store, catalog),
                max_body_bytes=cfg.http.max_body_bytes,
                body_timeout_s=cfg.http.body_timeout_s,
            )
            async with (
                _serving([web.post("/hooks/{source}", _bare_handler)]) as bare_url,
                _serving(routes) as our_url,
            ):
                baseline, ours = _Side(bare_url), _Side(our_url, store)
                await _alternate(
                    baseline,
                    ours,
                    script=script,
                    seconds=seconds,
                    connections=connections,
                    tag=run_tag,
                )
            stored = (await store.count_jobs_by_state())[JobState.RECEIVED]
        finally:
            await store.close()
    return _report(
        seconds,
        connections,
        loop_name,
        baseline=baseline.measured(),
        ours=ours.measured(),
        stored=stored,
    )


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
        f"intake: signed Shopify webhooks, wrk -t1 -c{connections}, {seconds:g} s a side in "
        f"{_slice_count(seconds)} alternating slices, event loop {loop_name}",
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
            *(
                (f"{name} CPU per request (ms)", ms)
                for name, ms in ours.thread_cpu_ms_per_request.items()
            ),
            ("jobs stored (warm-up included)", stored),
        ],
    )
    return {
        "loop": loop_name,
        "seconds": seconds,
        "slices": _slice_count(seconds),
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
        "studiohook_thread_cpu_ms": {
            name: round(ms, 3) for name, ms in ours.thread_cpu_ms_per_request.items()
        },
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
