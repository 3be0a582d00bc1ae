"""What every bench shares: the shipped config, signed Shopify deliveries, a store that notices
`ready` commits, figures and the printed table.

Not a bench itself. Each bench imports it as `_shared` (Python puts `bench/` first on the path
when a bench is run as `python bench/<name>.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import hmac
import math
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import orjson
import psutil  # type: ignore[import-untyped]

from service.aistudios.client import AIStudiosClient
from service.aistudios.simulator import Simulator, SimulatorKnobs
from service.catalog import Catalog, load_catalog
from service.config import Config, ConfigError, SourceConfig, read_config
from service.ingress.signatures import SHOPIFY_HEADER
from service.intake import StoreIntake
from service.jobs.budget import BudgetLimits
from service.jobs.pipeline import JobPipeline
from service.jobs.prepare import Preparer
from service.jobs.ratelimit import RequestGate
from service.jobs.submitter import RenderCache
from service.log import configure_logging
from service.model import Job, JobState, JobUpdate, NewOutboxMessage, RawEvent
from service.notify.build import outbox_rows_for
from service.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config.toml"
SHOPIFY_SOURCE = "shopify"
SHOPIFY_TOPIC = "products/create"
_SAMPLE_PRODUCT = ROOT / "examples" / "shopify-product-create.json"
_SAMPLE_HEADERS = ROOT / "examples" / "shopify-product-create.headers.json"
_PROCESS_START_TIMEOUT_S = 30.0


def parse_args(description: str) -> argparse.Namespace:
    """`--quick` for every bench; each bench prints what it means for it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller run (well under 20 s)")
    return parser.parse_args()


# --- the service's own configuration -------------------------------------------------------


def shipped_config(state_dir: Path, shopify_secret: str) -> Config:
    """The config.toml users start from, with state in `state_dir` and a fresh Shopify secret.

    Benches change only what they measure (with `dataclasses.replace`) and print it.
    """
    env = {"STUDIOHOOK_STATE_DIR": str(state_dir), "SHOPIFY_WEBHOOK_SECRET": shopify_secret}
    cfg, problems = read_config(SHIPPED_CONFIG, env)
    if problems:
        raise ConfigError(problems)
    return cfg


async def shipped_catalog(cfg: Config) -> Catalog:
    """Templates and compiled routes of the shipped config (file templates only: no network)."""
    catalog, problems = await load_catalog(cfg)
    if problems:
        raise ConfigError(problems)
    return catalog


def shopify_source(cfg: Config) -> SourceConfig:
    """The shipped config's Shopify source, which every bench feeds."""
    source = cfg.source(SHOPIFY_SOURCE)
    if source is None:
        raise RuntimeError(f"{cfg.path} has no source named {SHOPIFY_SOURCE!r}")
    return source


def configure_bench_logging(path: Path) -> None:
    """The service logs at its shipped level (info), as JSON, into a file: the cost is real,
    the terminal stays readable for the figures."""
    stream = path.open("a", encoding="utf-8")
    configure_logging(level="info", fmt="json", stream=stream)


# --- Shopify deliveries --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook exactly as Shopify sends it: body bytes and headers, signed."""

    body: bytes
    headers: dict[str, str]


@functools.cache
def _sample_bytes(path: Path) -> bytes:
    return path.read_bytes()


def shopify_delivery(index: int, secret: str, *, edit: int | None = None) -> Delivery:
    """A distinct `products/create` delivery (own product id, title and webhook id), signed.

    The same `index` is the same product with the same body (a re-publish); `edit` changes
    its title, as a merchant's save does.
    """
    product = orjson.loads(_sample_bytes(_SAMPLE_PRODUCT))
    product["id"] = 9_000_000_000_000 + index
    product["title"] = f"{product['title']} #{index}"
    if edit is not None:
        product["title"] += f" (edit {edit})"
    body = orjson.dumps(product)
    headers: dict[str, str] = orjson.loads(_sample_bytes(_SAMPLE_HEADERS))
    headers["X-Shopify-Webhook-Id"] = str(uuid.uuid4())
    headers["X-Shopify-Event-Id"] = str(uuid.uuid4())
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    headers["X-Shopify-Hmac-Sha256"] = base64.b64encode(digest).decode()
    return Delivery(body, headers)


def raw_event_of(delivery: Delivery) -> RawEvent:
    """What the webhook route hands the intake once the signature checked out."""
    headers = {k.lower(): v for k, v in delivery.headers.items() if k.lower() != SHOPIFY_HEADER}
    return RawEvent(source=SHOPIFY_SOURCE, payload=orjson.loads(delivery.body), headers=headers)


# --- a store that notices `ready` ----------------------------------------------------------


class WatchedStore(SQLiteStore):
    """The real SQLite store; also remembers when each `ready` commit RETURNED (wall clock),
    and wakes the bench once `expected` jobs are ready, so nothing polls the database."""

    def __init__(self, path: Path, *, expected: int, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.expected = expected
        self.ready_committed_at: dict[str, float] = {}
        self.all_ready = anyio.Event()
        self._ready_changed = anyio.Event()

    async def wait_ready(self, job_id: str) -> None:
        """Return once this job's `ready` commit has returned."""
        while job_id not in self.ready_committed_at:
            await self._ready_changed.wait()

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
        """The real transition; a `ready` one is timed when its commit is durable."""
        job = await super().transition(job_id, from_states, to_state, update, outbox, fence=fence)
        if to_state is JobState.READY:
            self.ready_committed_at[job_id] = time.time()
            self._ready_changed.set()
            self._ready_changed = anyio.Event()
            if len(self.ready_committed_at) >= self.expected:
                self.all_ready.set()
        return job


# --- figures -------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float, baseline: float) -> float:
    """value / baseline, NaN when the baseline is zero."""
    return value / baseline if baseline else math.nan


def rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process(os.getpid()).memory_info().rss)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table: readable in a terminal and pasteable into the README."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    print()
    print(title)
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    print(line)
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    sys.stdout.flush()


def emit_result(bench: str, figures: Mapping[str, object]) -> None:
    """The machine-readable last line: `RESULT {json}`."""
    data = {"bench": bench, **figures}
    option = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    print()
    print("RESULT " + orjson.dumps(data, option=option).decode(), flush=True)


def say(message: str) -> None:
    """Progress on stderr-free stdout, flushed so a slow phase shows what it waits for."""
    print(message, flush=True)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed:` then `elapsed[0]` is the wall time in seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


# --- the simulated cloud in its own process ------------------------------------------------


def _simulator_main(knobs: SimulatorKnobs, conn: Connection, log_path: Path) -> None:
    configure_bench_logging(log_path)
    asyncio.run(_serve_simulator(knobs, conn))


async def _serve_simulator(knobs: SimulatorKnobs, conn: Connection) -> None:
    simulator = Simulator(knobs, clock=time.time)
    conn.send(await simulator.start())
    try:
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    finally:
        await simulator.stop()


@contextmanager
def simulator_process(knobs: SimulatorKnobs, log_path: Path) -> Iterator[str]:
    """The simulator in a process of its own (its CPU is the cloud's, not the daemon's).

    Yields its base URL; stopped (then killed if need be) on exit. It logs into `log_path`.
    """
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_simulator_main, args=(knobs, theirs, log_path), daemon=True)
    process.start()
    try:
        if not ours.poll(_PROCESS_START_TIMEOUT_S):
            raise RuntimeError("the simulator process did not start")
        yield str(ours.recv())
    finally:
        ours.send("stop")
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


async def seed_events(
    intake: StoreIntake, source: SourceConfig, count: int, secret: str, *, concurrency: int = 128
) -> None:
    """Commit `count` distinct Shopify events through the real intake (no HTTP), many at once
    so group commit batches them; each becomes one `received` job."""
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        async with limiter:
            delivery = shopify_delivery(index, secret)
            await intake.accept(source, raw_event_of(delivery), delivery.body)

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)


@asynccontextmanager
async def real_pipeline(
    cfg: Config,
    store: SQLiteStore,
    catalog: Catalog,
    api_url: str,
    api_key: str,
    *,
    on_call: Callable[[str, str], None] | None = None,
    on_send: Callable[[str], None] | None = None,
    budget: BudgetLimits | None = None,
    cache: RenderCache | None = None,
) -> AsyncIterator[tuple[JobPipeline, list[int]]]:
    """The daemon's pipeline as app.py wires it, on `store`; with a count of API calls
    (`on_call` is told each call's endpoint and outcome as the client reports it, `on_send`
    each request's endpoint the moment the gate lets it leave). `budget` and `cache` are the
    spending caps and the render cache, as app.py builds them from the config."""
    calls = [0]

    def count_call(endpoint: str, outcome: str) -> None:
        calls[0] += 1
        if on_call is not None:
            on_call(endpoint, outcome)

    gate = RequestGate(
        cfg.aistudios.request_rate_ceiling,
        time.monotonic,
        hard_cap=cfg.aistudios.max_requests_per_second,
    )

    async def before_request(endpoint: str) -> None:
        await gate(endpoint)
        if on_send is not None:
            on_send(endpoint)

    async with AIStudiosClient(
        base_url=api_url,
        legacy_base_url=api_url,
        api_key=api_key,
        before_request=before_request,
        on_call=count_call,
    ) as client:

        def outbox_for(job: Job, event_type: str) -> list[NewOutboxMessage]:
            return list(outbox_rows_for(cfg, job, event_type))

        yield (
            JobPipeline(
                store=store,
                api=client,
                gate=gate,
                settings=cfg.aistudios,
                prepare=Preparer(cfg, catalog, store, outbox_for),
                outbox_for=outbox_for,
                budget=budget,
                cache=cache,
            ),
            calls,
        )
