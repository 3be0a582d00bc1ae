"""The daemon and the simulator as real OS processes, for crash and shutdown tests.

A thread reads each child's output line by line, so a test waits for a log line instead of
sleeping, and can have a signal sent the moment a line appears (`signal_on`): the reader sends
it itself, so a kill lands while the daemon is still between the two steps the line marks.
The store is read with sqlite3 in read-only mode, which WAL allows while the daemon writes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from service.model import job_id_for
from tests.support.mqtt_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "product-promo.json"
SHOPIFY_SECRET = "shpss_crash_secret"
SHOP_SOURCE = "shop"
SHOP_ROUTE = "new-product"
DEVICE_SOURCE = "devices"
DEVICE_ROUTE = "device-product"
READY_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 10.0
POLL_S = 0.02

Record = dict[str, Any]


class ChildProcess:
    """One run of a child process whose merged stdout/stderr is read as it comes."""

    def __init__(
        self,
        argv: list[str],
        *,
        name: str,
        signal_on: Mapping[str, signal.Signals] | None = None,
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self.records: list[Record] = []
        self.signalled: list[tuple[signal.Signals, Record]] = []
        self.signalled_at: float | None = None
        self._triggers = dict(signal_on or {})
        self._counted_triggers: list[tuple[dict[str, int], signal.Signals]] = []
        self._seen: dict[str, int] = {}
        self._line_actions: list[tuple[str, Callable[[], None]]] = []
        self._changed = threading.Condition()
        self._eof = False
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            record = _parse(line)
            with self._changed:
                if record is not None:
                    self._maybe_signal(record)
                    self.records.append(record)
                self._maybe_act(line)
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def signal_when(self, counts: Mapping[str, int], sig: signal.Signals) -> None:
        """Send `sig` from the reader, once, as soon as each event in `counts` was logged at
        least that many times (records read before arming count too)."""
        with self._changed:
            self._counted_triggers.append((dict(counts), sig))
            self._maybe_signal(None)

    def _maybe_signal(self, record: Record | None) -> None:
        """Send the signal armed for this record's event, once, before reading on."""
        sig = None
        if record is not None:
            event = str(record.get("event"))
            self._seen[event] = self._seen.get(event, 0) + 1
            sig = self._triggers.pop(event, None)
        for armed in self._counted_triggers:
            if all(self._seen.get(event, 0) >= n for event, n in armed[0].items()):
                self._counted_triggers.remove(armed)
                sig = armed[1]
                break
        if sig is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)
        self.signalled_at = time.monotonic()
        self.signalled.append((sig, record or {}))

    def when_line(self, text: str, action: Callable[[], None]) -> None:
        """Run `action` (once) from the reader when a later line contains `text`."""
        with self._changed:
            self._line_actions.append((text, action))

    def _maybe_act(self, line: str) -> None:
        for armed in [a for a in self._line_actions if a[0] in line]:
            self._line_actions.remove(armed)
            armed[1]()

    def wait_for(
        self, match: Callable[[Record], bool], *, what: str, timeout_s: float = READY_TIMEOUT_S
    ) -> Record | None:
        """The first record that matches; None when the process ended without one."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((r for r in self.records if match(r)), None)
                if found is not None or self._eof:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{self.name}: no {what} within {timeout_s}s\n{self.tail()}")
                self._changed.wait(left)

    def wait_for_text(self, text: str, *, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Wait for a raw line containing `text` (for children that log in console format)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def wait_count(self, event: str, count: int, *, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Wait until `event` was logged `count` times; False when the process ended first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._seen.get(event, 0) < count:
                left = deadline - time.monotonic()
                if self._eof:
                    return False
                if left <= 0:
                    pytest.fail(f"{self.name}: no {count} x {event} in {timeout_s}s\n{self.tail()}")
                self._changed.wait(left)
        return True

    def events(self, event: str) -> list[Record]:
        """Every record of `event` logged so far."""
        with self._changed:
            return [r for r in self.records if r.get("event") == event]

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the process to end and its output to be read to the end."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout_s}s\n{self.tail()}")
        self._reader.join(timeout=timeout_s)
        return code

    def send(self, sig: signal.Signals) -> None:
        """Send a signal now (no-op when the process already ended)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            self.signalled_at = time.monotonic()

    def kill(self) -> None:
        """SIGKILL and reap; safe to call on a process that already ended."""
        self.send(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=EXIT_TIMEOUT_S)
        self._reader.join(timeout=EXIT_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def tail(self, lines: int = 40) -> str:
        with self._changed:
            return "\n".join(self.lines[-lines:])


def _parse(line: str) -> Record | None:
    if not line.startswith("{"):
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --- the daemon ----------------------------------------------------------------------------


@dataclass
class Daemon:
    """`python -m service serve` on one config and state dir, started again after each death."""

    config_path: Path
    state_dir: Path
    runs: list[ChildProcess] = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "studiohook.db"

    @property
    def current(self) -> ChildProcess:
        return self.runs[-1]

    def start(self, *, signal_on: Mapping[str, signal.Signals] | None = None) -> str | None:
        """Start a run; return its HTTP URL once ready, or None if a signal the test sent
        (`signal_on`, or `send` from a trigger armed elsewhere) ended it first: recovery may
        reach the armed moment before `service.ready` when the machine is busy."""
        self.launch(signal_on=signal_on)
        return self.wait_ready()

    def launch(self, *, signal_on: Mapping[str, signal.Signals] | None = None) -> ChildProcess:
        """Start a run without waiting for it (start several, then `wait_ready` each)."""
        argv = [sys.executable, "-m", "service", "serve", "--config", str(self.config_path)]
        name = f"{self.config_path.stem} run {len(self.runs) + 1}"
        run = ChildProcess(argv, name=name, signal_on=signal_on)
        self.runs.append(run)
        return run

    def wait_ready(self) -> str | None:
        """The current run's HTTP URL once ready, or None if a signal ended it first."""
        run = self.current
        ready = run.wait_for(lambda r: r.get("event") == "service.ready", what="service.ready")
        if ready is None:
            if not run.signalled and run.signalled_at is None:
                pytest.fail(f"{run.name} died before it was ready\n{run.tail()}")
            return None
        return str(ready["http"])

    def kill_all(self) -> None:
        for run in self.runs:
            run.kill()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """Daemons on configs written to tmp_path; every run is killed when the test ends."""
    daemons: list[Daemon] = []

    def make(config_text: str) -> Daemon:
        path = tmp_path / f"config-{len(daemons)}.toml"
        path.write_text(config_text)
        daemon = Daemon(path, tmp_path / "state")
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill_all()


def daemon_config(
    tmp_path: Path,
    *,
    api_url: str | None = None,
    render_seconds: float = 0.5,
    max_concurrent_exports: int = 4,
    mqtt_port: int | None = None,
    mqtt_prefix: str = "crash",
    mqtt_reader_check_s: float = 1.0,
    notify_file: str = "videos.jsonl",
    max_requests_per_second: float = 200,
) -> str:
    """A json-logging config with small timings; `api_url` is an outside simulator's.

    `notify_file` (in tmp_path) receives the announcements, one JSON line each.
    """
    api = f'base_url = "{api_url}"\nlegacy_base_url = "{api_url}"\napi_key = "k"' if api_url else ""
    mqtt = ""
    if mqtt_port is not None:
        mqtt = f"""
[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "{mqtt_prefix}-ingress"
session_expiry_seconds = 300
reader_check_seconds = {mqtt_reader_check_s}

[[sources]]
name = "{DEVICE_SOURCE}"
kind = "mqtt"
topic = "{mqtt_prefix}/in/#"
dedupe_key = "id"

[[routes]]
name = "{DEVICE_ROUTE}"
source = "{DEVICE_SOURCE}"
events = ["{mqtt_prefix}/in/#"]
template = "promo"

[routes.patches]
"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "{{{{ product.title }}}}"
"""
    return f"""
[service]
state_dir = "{tmp_path / "state"}"
log_format = "json"
log_level = "info"
shutdown_grace_seconds = 2

[http]
listen = "127.0.0.1:0"

[aistudios]
{api}
max_concurrent_exports = {max_concurrent_exports}
max_requests_per_second = {max_requests_per_second}
poll_min_interval_seconds = 0.05
poll_max_interval_seconds = 0.5
first_poll_seconds = 0.2
reconcile_wait_seconds = 0.5
export_settle_seconds = 0.5

[aistudios.simulator]
render_seconds = {render_seconds}

[[sources]]
name = "{SHOP_SOURCE}"
kind = "shopify"
secrets = ["{SHOPIFY_SECRET}"]

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "{SHOP_ROUTE}"
source = "{SHOP_SOURCE}"
events = ["products/create"]
template = "promo"

[routes.patches]
"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "Meet {{{{ product.title }}}}."
{mqtt}
[[notify]]
name = "videos-file"
kind = "file"
path = "{tmp_path / notify_file}"
"""


# --- the simulator -------------------------------------------------------------------------


@dataclass
class SimulatorProcess:
    """`python -m service simulator` in its own process, so renders outlive a daemon."""

    run: ChildProcess
    url: str

    def state(self) -> dict[str, Any]:
        """GET /_simulator/state: every project the simulated service created."""
        with urllib.request.urlopen(f"{self.url}/_simulator/state", timeout=5) as response:  # noqa: S310 - loopback URL built here
            state: dict[str, Any] = orjson.loads(response.read())
        return state

    def exports_per_job(self, job_ids: list[str]) -> dict[str, int]:
        """How many exports were billed under each job's export name (`... #<job_id>`).

        Billed exports, not projects: an unbilled draft does not count, and a second export
        of one project counts twice.
        """
        billed = [(str(p["name"]), int(p["exports"])) for p in self.state()["projects"]]
        return {
            job_id: sum(n for name, n in billed if name.endswith(f"#{job_id}"))
            for job_id in job_ids
        }

    def set_knobs(self, **knobs: object) -> None:
        """POST /_simulator/knobs: inject failures into the simulated service."""
        request = urllib.request.Request(  # noqa: S310 - loopback URL built here
            f"{self.url}/_simulator/knobs",
            data=orjson.dumps(knobs),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback URL built here
            response.read()


@pytest.fixture
def simulator_process() -> Iterator[Callable[[float], SimulatorProcess]]:
    """Factory of simulator processes on free ports; killed when the test ends."""
    started: list[ChildProcess] = []

    def start(render_seconds: float) -> SimulatorProcess:
        port = free_port()
        argv = [sys.executable, "-m", "service", "simulator", "--port", str(port)]
        run = ChildProcess(
            [*argv, "--render-seconds", str(render_seconds)], name=f"simulator :{port}"
        )
        started.append(run)
        if not run.wait_for_text("simulator_listening"):
            pytest.fail(f"simulator did not start\n{run.tail()}")
        return SimulatorProcess(run, f"http://127.0.0.1:{port}")

    yield start
    for run in started:
        run.kill()


# --- deliveries and the store --------------------------------------------------------------


def shopify_delivery(
    webhook_id: str, title: str, *, topic: str = "products/create"
) -> tuple[bytes, dict[str, str]]:
    """A genuinely signed Shopify product delivery (`products/create` unless told)."""
    product_id = int(hashlib.sha256(webhook_id.encode()).hexdigest()[:12], 16)
    body = orjson.dumps({"id": product_id, "title": title, "handle": title})
    digest = hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()
    headers = {
        "Content-Type": "application/json",
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Topic": topic,
        "X-Shopify-Webhook-Id": webhook_id,
    }
    return body, headers


def post_delivery(
    url: str, webhook_id: str, title: str, *, topic: str = "products/create"
) -> int | None:
    """POST one delivery; its status, or None when the connection failed (daemon gone)."""
    body, headers = shopify_delivery(webhook_id, title, topic=topic)
    request = urllib.request.Request(  # noqa: S310 - loopback URL built here
        f"{url}/hooks/{SHOP_SOURCE}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def shop_job_id(webhook_id: str, route: str = SHOP_ROUTE) -> str:
    """The job a Shopify delivery becomes on `route` (the id is derived from its dedupe key)."""
    return job_id_for(SHOP_SOURCE, f"h:{webhook_id}", route)


def device_job_id(message_id: str) -> str:
    """The job an MQTT product message with this `id` becomes."""
    return job_id_for(DEVICE_SOURCE, f"j:{message_id}", DEVICE_ROUTE)


@contextlib.contextmanager
def read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection: never takes a write lock from the daemon."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        yield connection
    finally:
        connection.close()


def inbox_keys(store: Path | str, source: str) -> dict[str, int]:
    """How many inbox rows each dedupe key of `source` has, in a SQLite file or PostgreSQL URL."""
    query = "SELECT dedupe_key, COUNT(*) FROM events WHERE source = {} GROUP BY dedupe_key"
    if isinstance(store, str):
        with psycopg.connect(store) as conn:
            rows = conn.execute(query.format("%s"), (source,)).fetchall()
    else:
        with read_only(store) as db:
            rows = db.execute(query.format("?"), (source,)).fetchall()
    return {str(key): int(count) for key, count in rows}


def job_states(db_path: Path) -> dict[str, str]:
    """Every job's current state."""
    with read_only(db_path) as db:
        rows = db.execute("SELECT job_id, state FROM jobs").fetchall()
    return {str(job_id): str(state) for job_id, state in rows}


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout_s: float = 20.0,
    explain: Callable[[], str] = str,
) -> None:
    """Poll state another process produces (it logs no line for it)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{explain()}")
        time.sleep(POLL_S)


def ready_rounds(path: Path) -> dict[tuple[str, str], int]:
    """How many `video.ready` lines the JSONL notify file has per (job, project): per round."""
    counts: dict[tuple[str, str], int] = {}
    if not path.exists():
        return counts
    for line in path.read_bytes().splitlines():
        event = orjson.loads(line)
        if event.get("type") == "video.ready":
            key = (str(event["job_id"]), str(event["project_id"]))
            counts[key] = counts.get(key, 0) + 1
    return counts


def ready_lines(path: Path) -> dict[str, int]:
    """How many `video.ready` lines the JSONL notify file has per job."""
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    for line in path.read_bytes().splitlines():
        event = orjson.loads(line)
        if event.get("type") == "video.ready":
            counts[event["job_id"]] = counts.get(event["job_id"], 0) + 1
    return counts
