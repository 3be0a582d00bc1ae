"""Several instances on PostgreSQL: webhook intake on each engine, and the take-over after a kill -9.

Part 1, intake. The same signed Shopify deliveries as `intake.py` (its wrk Lua script, one fresh
`X-Shopify-Webhook-Id` per request) against three set-ups, each on a fresh store:

  sqlite-1    one instance on a SQLite file (the baseline, measured in this run)
  postgres-1  one instance on a PostgreSQL database
  postgres-2  two instances on one PostgreSQL database; one wrk process per instance, each with
              half the connections, started together (requests add up; the p99 is the worse
              of the two wrk runs)

Each instance is an OS process of its own running the intake as the daemon wires it
(`webhook_routes` + `StoreIntake` + the store `store_from_url` builds, on the daemon's event
loop), without the job pipeline, as in `intake.py`: what is measured is receiving and
committing, not rendering. Every 2xx answer followed a commit; the bench counts the jobs the
store holds afterwards against the 2xx answers wrk saw.

Part 2, take-over. Two real `studiohook serve` processes on one PostgreSQL database and the
simulator (`python -m service simulator`, renders of R s): webhooks go to both, instance `a`
is killed with SIGKILL while it tracks renders. Printed beside `lease_seconds`: the time from
the kill to the survivor's first claim of a dead instance's job, to its first committed
transition on one, and to all of them `ready`; then the billed exports per job (must be 1).
Exit status 1 when a job was billed other than once or a 2xx answer has no job in the store.

PostgreSQL is the server on 127.0.0.1:5432 (STUDIOHOOK_TEST_POSTGRES names another admin URL);
each set-up gets a database of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the daemon and PostgreSQL helpers the tests use
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
import psycopg  # noqa: E402
from _shared import (  # noqa: E402
    SHOPIFY_SOURCE,
    configure_bench_logging,
    emit_result,
    print_table,
    ratio,
    say,
    shipped_catalog,
    shipped_config,
)
from aiohttp import web  # noqa: E402
from intake import run_wrk, write_lua  # noqa: E402
from psycopg import sql  # noqa: E402

from service.eventloop import loop_options  # noqa: E402
from service.ingress.webhooks import webhook_routes  # noqa: E402
from service.intake import StoreIntake  # noqa: E402
from service.jobs.states import IN_FLIGHT as IN_FLIGHT_STATES  # noqa: E402
from service.store.factory import store_from_url  # noqa: E402
from tests.support.daemon_fixtures import (  # noqa: E402
    ChildProcess,
    Daemon,
    SimulatorProcess,
    post_delivery,
    shop_job_id,
)
from tests.support.instance_fixtures import instance_config, jobs_by  # noqa: E402
from tests.support.mqtt_fixtures import free_port  # noqa: E402
from tests.support.postgres_fixtures import ADMIN_URL, database_url  # noqa: E402

FULL_S, QUICK_S = 10.0, 3.0
WARMUP_S = 2.0
CONNECTIONS = 32
LEASE_S, QUICK_LEASE_S = 5.0, 2.0
RENDER_S = 3.0
TAKEOVER_EVENTS = 16
_POLL_S = 0.01
_IN_FLIGHT = {state.value for state in IN_FLIGHT_STATES}
_START_TIMEOUT_S = 30.0


# --- part 1: intake -------------------------------------------------------------------------


async def _serve_intake(store_url: str, instance: str, state: Path, secret: str) -> None:
    """One intake process: the daemon's webhook routes on `store_url`; prints its port."""
    state.mkdir(parents=True, exist_ok=True)
    cfg = shipped_config(state, secret)
    configure_bench_logging(state / f"intake-{instance}.log")
    catalog = await shipped_catalog(cfg)
    store = store_from_url(store_url, instance=instance)
    await store.open()
    app = web.Application(client_max_size=cfg.http.max_body_bytes + 1)
    app.add_routes(
        webhook_routes(
            sources={s.name: s for s in cfg.sources},
            intake=StoreIntake(store, catalog),
            max_body_bytes=cfg.http.max_body_bytes,
            body_timeout_s=cfg.http.body_timeout_s,
        )
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    try:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
    finally:
        await runner.cleanup()
        await store.close()


@dataclass
class IntakeProcess:
    """A `--serve-intake` child: its process and the URL wrk posts to."""

    process: subprocess.Popen[bytes]
    url: str

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _start_intake(store_url: str, instance: str, state: Path, secret: str) -> IntakeProcess:
    argv = [sys.executable, __file__, "--serve-intake", store_url, "--instance", instance]
    argv += ["--state", str(state), "--secret", secret]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"intake process {instance} did not start: {line!r}")
    return IntakeProcess(process, f"http://127.0.0.1:{int(line.split()[1])}/hooks/{SHOPIFY_SOURCE}")


@dataclass(frozen=True, slots=True)
class Intake:
    """One set-up's figures: wrk's view of all its instances, their CPU, what the store holds."""

    setup: str
    instances: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_ms_per_request: float
    postgres_cpu_ms_per_request: float
    jobs_stored: int
    answered_2xx: int


async def _wrk_all(
    script: Path, urls: list[str], *, seconds: float, connections: int, tag: str
) -> list[dict[str, Any]]:
    """One wrk process per URL, started together, the connections split between them."""
    results: list[dict[str, Any]] = [{} for _ in urls]
    share = max(1, connections // len(urls))

    async def one(index: int, url: str) -> None:
        results[index] = await run_wrk(
            script, url, seconds=seconds, connections=share, tag=f"{tag}-{index}"
        )

    async with anyio.create_task_group() as tg:
        for index, url in enumerate(urls):
            tg.start_soon(one, index, url)
    return results


def _postgres_cpu_s() -> dict[int, float]:
    """CPU seconds of every PostgreSQL server process, by pid (backends started since count
    from zero; the machine's other PostgreSQL users, if any, are counted too)."""
    found: dict[int, float] = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        if process.info["name"] == "postgres" and process.info["cpu_times"] is not None:
            times = process.info["cpu_times"]
            found[process.pid] = float(times.user + times.system)
    return found


def _jobs_in(store_url: str) -> int:
    if store_url.startswith("sqlite:///"):
        import sqlite3  # noqa: PLC0415 - only the SQLite set-up reads a file

        with contextlib.closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    with psycopg.connect(store_url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
    return int(row[0]) if row else 0


def _measure_intake(
    setup: str,
    store_url: str,
    instances: int,
    *,
    tmp: Path,
    script: Path,
    secret: str,
    seconds: float,
    connections: int,
) -> Intake:
    say(f"{setup}: {instances} intake process(es), wrk -c{connections} -d{seconds:g}s")
    servers = [
        _start_intake(store_url, f"{setup}-{n}", tmp / setup, secret) for n in range(instances)
    ]
    urls = [s.url for s in servers]
    tag = secrets.token_hex(4)
    try:
        warm = anyio.run(
            lambda: _wrk_all(
                script, urls, seconds=min(WARMUP_S, seconds), connections=connections, tag=f"{tag}w"
            )
        )
        cpu0 = sum(s.cpu_s() for s in servers)
        postgres0 = _postgres_cpu_s()
        runs = anyio.run(
            lambda: _wrk_all(script, urls, seconds=seconds, connections=connections, tag=tag)
        )
        cpu = sum(s.cpu_s() for s in servers) - cpu0
        postgres_cpu = sum(t - postgres0.get(pid, 0.0) for pid, t in _postgres_cpu_s().items())
    finally:
        for server in servers:
            server.stop()
    count = sum(int(r["requests"]) for r in runs)
    errors = sum(int(r["non_2xx"]) for r in runs)
    answered = sum(int(r["requests"]) - int(r["non_2xx"]) for r in [*warm, *runs])
    duration_s = max(r["duration_us"] for r in runs) / 1e6
    return Intake(
        setup=setup,
        instances=instances,
        requests=count,
        requests_per_s=count / duration_s,
        p50_ms=max(r["p50_us"] for r in runs) / 1000,
        p99_ms=max(r["p99_us"] for r in runs) / 1000,
        max_ms=max(r["max_us"] for r in runs) / 1000,
        non_2xx=errors,
        socket_errors=sum(int(r["socket_errors"]) for r in runs),
        server_cpu_ms_per_request=cpu * 1000 / max(count, 1),
        postgres_cpu_ms_per_request=(
            postgres_cpu * 1000 / max(count, 1) if store_url.startswith("postgres") else 0.0
        ),
        jobs_stored=_jobs_in(store_url),
        answered_2xx=answered,
    )


@contextlib.contextmanager
def _fresh_database(tag: str) -> Iterator[str]:
    """A database of its own for one set-up, dropped (FORCE: killed instances too) at the end."""
    name = f"studiohook_bench_{tag}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def intake_part(tmp: Path, *, seconds: float, connections: int) -> list[Intake]:
    """The three set-ups, one after the other, each on a fresh store."""
    secret = secrets.token_hex(16)
    script = tmp / "shopify.lua"
    write_lua(script, secret)
    common = {"tmp": tmp, "script": script, "secret": secret, "seconds": seconds}
    results = [
        _measure_intake(
            "sqlite-1",
            f"sqlite:///{tmp / 'sqlite-1.db'}",
            1,
            connections=connections,
            **common,  # type: ignore[arg-type]
        )
    ]
    for setup, instances in (("postgres-1", 1), ("postgres-2", 2)):
        with _fresh_database(setup.replace("-", "")) as url:
            results.append(
                _measure_intake(setup, url, instances, connections=connections, **common)  # type: ignore[arg-type]
            )
    return results


# --- part 2: take-over after a kill -9 --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Seconds from the kill of `a` to what the survivor did with a's jobs.

    Claim times are the store's (a claim writes `lease_until = now + lease`), transition
    times too (`transitions.at`): the bench's polling only finds them.
    """

    lease_s: float
    in_flight: int
    waiting: int
    first_claim_s: float
    in_flight_claimed_s: float
    waiting_claimed_s: float | None
    first_transition_s: float
    all_ready_s: float
    billed: dict[str, int]


@contextlib.contextmanager
def _simulator(render_s: float) -> Iterator[SimulatorProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "service", "simulator", "--port", str(port)]
    run = ChildProcess([*argv, "--render-seconds", str(render_s)], name=f"simulator :{port}")
    try:
        if not run.wait_for_text("simulator_listening"):
            raise RuntimeError(f"the simulator did not start\n{run.tail()}")
        yield SimulatorProcess(run, f"http://127.0.0.1:{port}")
    finally:
        run.kill()


def _claims(database: str) -> dict[str, tuple[str, str | None, float | None]]:
    """Every job's state, owner and lease end."""
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT job_id, state, owner, lease_until FROM jobs").fetchall()
    return {job_id: (state, owner, until) for job_id, state, owner, until in rows}


def _first_transition_after(database: str, jobs: set[str], since: float) -> float | None:
    """When the first transition on any of `jobs` committed after `since` (store clock)."""
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT MIN(at) FROM transitions WHERE job_id = ANY(%s) AND at > %s",
            (list(jobs), since),
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def _wait(check: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s:g} s")
        time.sleep(_POLL_S)


def _claimed_by_b(
    database: str, orphans: set[str], lease_s: float, timeout_s: float
) -> dict[str, float]:
    """When b claimed each orphan: its lease end at first sight, minus one lease (before the
    first renewal, a third of a lease later, could move it)."""
    claimed: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(claimed) < len(orphans):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"b claimed {len(claimed)} of {len(orphans)} orphans in {timeout_s:g} s"
            )
        for job_id, (_, owner, until) in _claims(database).items():
            if job_id in orphans and owner == "b" and until is not None:
                claimed.setdefault(job_id, until - lease_s)
        time.sleep(_POLL_S)
    return claimed


def takeover_part(tmp: Path, *, lease_s: float, render_s: float) -> TakeOver:
    """Two serve processes, webhooks to both, `a` killed while it tracks renders."""
    say(f"take-over: two instances, lease_seconds = {lease_s:g}, renders of {render_s:g} s")
    with _fresh_database("takeover") as database, _simulator(render_s) as simulator:
        daemons: list[Daemon] = []
        try:
            urls: dict[str, str] = {}
            for name in ("a", "b"):
                config = tmp / f"takeover-{name}.toml"
                text = instance_config(
                    tmp, simulator.url, database, name, lease_s=lease_s, max_concurrent_exports=8
                )
                config.write_text(text)
                daemons.append(Daemon(config, tmp / f"state-{name}"))
                url = daemons[-1].start()
                if url is None:
                    raise RuntimeError(f"instance {name} did not start")
                urls[name] = url
            ids = [f"takeover-{n}-{uuid.uuid4().hex[:8]}" for n in range(TAKEOVER_EVENTS)]
            for n, webhook_id in enumerate(ids):
                status = post_delivery(urls["ab"[n % 2]], webhook_id, f"Kettle {n}")
                if status != 202:
                    raise RuntimeError(f"delivery {webhook_id} answered {status}")
            jobs = [shop_job_id(webhook_id) for webhook_id in ids]
            _wait(
                lambda: ("submitted", "a") in jobs_by(database).values(),
                "render tracked by a",
                _START_TIMEOUT_S,
            )
            daemons[0].current.kill()
            killed_at = time.time()
            held = {j: state for j, (state, owner) in jobs_by(database).items() if owner == "a"}
            in_flight = {j for j, state in held.items() if state in _IN_FLIGHT}
            waiting = {j for j, state in held.items() if state in {"received", "mapped"}}
            orphans = in_flight | waiting
            claimed = _claimed_by_b(database, orphans, lease_s, lease_s * 3 + 10)
            _wait(
                lambda: _first_transition_after(database, orphans, killed_at) is not None,
                "transition by b",
                render_s + lease_s * 3 + 10,
            )
            first_transition = _first_transition_after(database, orphans, killed_at) or 0.0
            _wait(
                lambda: all(_claims(database)[j][0] in {"ready", "notified"} for j in orphans),
                "ready for every orphan",
                render_s + lease_s * 3 + 20,
            )
            all_ready = time.time()
            _wait(
                lambda: {s for s, _ in jobs_by(database).values()} == {"notified"},
                "every job notified",
                render_s * 4 + 20,
            )
            billed = simulator.exports_per_job(jobs)
        finally:
            for daemon in daemons:
                daemon.kill_all()
    return TakeOver(
        lease_s=lease_s,
        in_flight=len(in_flight),
        waiting=len(waiting),
        first_claim_s=min(claimed.values()) - killed_at,
        in_flight_claimed_s=max((claimed[j] for j in in_flight), default=math.nan) - killed_at,
        waiting_claimed_s=max(claimed[j] for j in waiting) - killed_at if waiting else None,
        first_transition_s=first_transition - killed_at,
        all_ready_s=all_ready - killed_at,
        billed=billed,
    )


# --- the report ---------------------------------------------------------------------------


def report(
    intakes: list[Intake], takeover: TakeOver, *, seconds: float, connections: int, loop: str
) -> dict[str, Any]:
    baseline = intakes[0]
    print_table(
        f"webhook intake: signed Shopify deliveries, wrk -t1 -c{connections} -d{seconds:g}s in"
        f" all (split between instances), event loop {loop}; ratio = against sqlite-1",
        [
            "set-up",
            "req/s",
            "ratio",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU ms/req",
            "PG CPU ms/req",
            "non-2xx/errors",
            "2xx all stored",
        ],
        [
            (
                i.setup,
                i.requests_per_s,
                ratio(i.requests_per_s, baseline.requests_per_s),
                i.p50_ms,
                i.p99_ms,
                i.max_ms,
                i.server_cpu_ms_per_request,
                i.postgres_cpu_ms_per_request or "-",
                f"{i.non_2xx}/{i.socket_errors}",
                "yes" if i.jobs_stored >= i.answered_2xx else f"NO: {i.jobs_stored}",
            )
            for i in intakes
        ],
    )
    lease = takeover.lease_s
    scan_s = lease / 3
    t = takeover
    waiting_row = (
        [(f"every claimed-not-submitted one ({t.waiting})", t.waiting_claimed_s, lease, 2 * lease)]
        if t.waiting_claimed_s is not None
        else []
    )
    twice = sum(1 for n in t.billed.values() if n != 1)
    print_table(
        f"take-over after kill -9: the dead instance held {t.in_flight} jobs in flight"
        f" (export committed) and {t.waiting} claimed, not yet submitted",
        ["figure", "s after the kill", "lease_seconds", "bound"],
        [
            ("survivor's first claim of one", t.first_claim_s, lease, lease + scan_s),
            (
                f"every in-flight one claimed ({t.in_flight})",
                t.in_flight_claimed_s,
                lease,
                lease + scan_s,
            ),
            *waiting_row,
            ("survivor's first transition on one", t.first_transition_s, lease, "-"),
            ("every one of them ready", t.all_ready_s, lease, "-"),
        ],
    )
    print(
        "bound: a lease renewed just before the kill ends a lease later; the survivor's lease"
        " scan (every third of a lease) claims in-flight jobs, its submitter looks again at a"
        " claimed `mapped` job a lease after finding it held."
    )
    print(f"jobs billed other than once: {twice} of {len(takeover.billed)}")
    figures: dict[str, Any] = {"loop": loop, "seconds": seconds, "connections": connections}
    for i in intakes:
        key = i.setup.replace("-", "_")
        figures[f"{key}_rps"] = round(i.requests_per_s, 1)
        figures[f"{key}_p99_ms"] = round(i.p99_ms, 2)
        figures[f"{key}_cpu_ms"] = round(i.server_cpu_ms_per_request, 3)
        figures[f"{key}_pg_cpu_ms"] = round(i.postgres_cpu_ms_per_request, 3)
        figures[f"{key}_all_committed"] = i.jobs_stored >= i.answered_2xx
    figures.update(
        lease_seconds=takeover.lease_s,
        takeover_in_flight=takeover.in_flight,
        takeover_waiting=takeover.waiting,
        takeover_first_claim_s=round(takeover.first_claim_s, 2),
        takeover_in_flight_claimed_s=round(takeover.in_flight_claimed_s, 2),
        takeover_waiting_claimed_s=(
            None if takeover.waiting_claimed_s is None else round(takeover.waiting_claimed_s, 2)
        ),
        takeover_first_transition_s=round(takeover.first_transition_s, 2),
        takeover_all_ready_s=round(takeover.all_ready_s, 2),
        billed_other_than_once=twice,
    )
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_S:g} s of wrk per set-up (not {FULL_S:g} s), lease {QUICK_LEASE_S:g} s",
    )
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--lease", type=float, help=f"lease_seconds (default {LEASE_S:g})")
    parser.add_argument("--render", type=float, default=RENDER_S, help="render length, seconds")
    # The intake child process (not for direct use).
    parser.add_argument("--serve-intake", metavar="STORE_URL", help=argparse.SUPPRESS)
    parser.add_argument("--instance", help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    """`python bench/instances.py [--quick] [--connections C] [--lease S] [--render R]`."""
    args = parse_args()
    options, loop = loop_options(prefer_uvloop=True)
    if args.serve_intake:
        anyio.run(
            _serve_intake,
            args.serve_intake,
            args.instance,
            args.state,
            args.secret,
            backend_options=options,
        )
        return
    if shutil.which("wrk") is None:
        raise SystemExit("bench/instances.py needs wrk on the PATH (Debian: apt-get install wrk)")
    seconds = QUICK_S if args.quick else FULL_S
    lease_s = args.lease or (QUICK_LEASE_S if args.quick else LEASE_S)
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as name:
        tmp = Path(name)
        intakes = intake_part(tmp, seconds=seconds, connections=args.connections)
        takeover = takeover_part(tmp, lease_s=lease_s, render_s=args.render)
    figures = report(intakes, takeover, seconds=seconds, connections=args.connections, loop=loop)
    emit_result("instances", figures)
    committed = all(i.jobs_stored >= i.answered_2xx for i in intakes)
    sys.exit(0 if committed and not figures["billed_other_than_once"] else 1)


if __name__ == "__main__":
    main()
