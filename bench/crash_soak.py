"""Crash soak, full form: the daemon killed with `kill -9` again and again while events arrive.

Real parts only, each a process of its own: the daemon (`python -m service serve`, a real
SQLite file), a private Mosquitto on a free port with persistence, and the simulator
(`python -m service simulator`) so renders go on while the daemon is dead. The test suite
runs a short form of the same soak (tests/test_e2e_crash.py); this is the long one.

  events      N (400) events, mixed: signed Shopify webhooks over HTTP (one sender, in
              order, re-sending whatever a dying daemon did not acknowledge) and QoS 1 MQTT
              messages from a paho publisher (acknowledged by the persistent broker, which
              holds them for the daemon's session while it is dead), both paced over the
              kill phase.
  kills       K (12) `kill -9` at random moments 0.3 ... 2.5 s after each start, while events
              arrive and renders run; before each start the simulator is told to drop the
              response of the next 2 draft creates and the next 2 exports.
  check       after the last restart: every acknowledged event has exactly one billed export
              (the simulator's billed count per export name) and a `video.ready` line, within
              60 s + 5 render lengths. Exit 1 if a job is billed twice, one is missing, or it
              takes longer.

The daemon runs the tests' config (small poll timings, settle 0.5 s), renders of R s +- 20 %.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the daemon and broker helpers the crash tests use
    sys.path.insert(0, str(ROOT))

from _shared import emit_result, print_table, say  # noqa: E402

from service.model import job_id_for  # noqa: E402
from tests.support.daemon_fixtures import (  # noqa: E402
    DEVICE_ROUTE,
    DEVICE_SOURCE,
    ChildProcess,
    Daemon,
    SimulatorProcess,
    daemon_config,
    job_states,
    post_delivery,
    ready_lines,
    shop_job_id,
)
from tests.support.mqtt_fixtures import PrivateBroker, free_port  # noqa: E402

ACCEPTED = {200, 202}
JITTER = 0.2
LOST_PER_RUN = 2
PREFIX = "soak"


@dataclass
class Feed:
    """What the senders acknowledged so far, shared by the sender threads and the main one."""

    url: str | None = None
    webhooks_acked: list[str] = field(default_factory=list)
    mqtt_acked: list[str] = field(default_factory=list)
    resent: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)
    stop: bool = False

    def set_url(self, url: str | None) -> None:
        with self.changed:
            self.url = url
            self.changed.notify_all()

    def wait_url(self, stale: str | None) -> str | None:
        """A daemon URL other than `stale` (the one that just refused), or None when stopping."""
        with self.changed:
            while not self.stop and (self.url is None or self.url == stale):
                self.changed.wait(0.5)
            return None if self.stop else self.url


def _send_webhooks(feed: Feed, ids: list[str], interval_s: float) -> None:
    """POST each delivery in order; one the daemon did not acknowledge is sent again."""
    for webhook_id in ids:
        url = feed.wait_url(None)
        while url is not None:
            status = post_delivery(url, webhook_id, f"Product {webhook_id}")
            if status in ACCEPTED:
                with feed.changed:
                    feed.webhooks_acked.append(webhook_id)
                break
            if status is not None:
                raise RuntimeError(f"{webhook_id}: HTTP {status}")
            feed.resent += 1
            url = feed.wait_url(url)
        time.sleep(interval_s)


def _publish_mqtt(feed: Feed, broker: PrivateBroker, ids: list[str], interval_s: float) -> None:
    """Publish QoS 1, paced; a message counts once the broker acknowledged it (it owns it)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{PREFIX}-publisher", protocol=mqtt.MQTTv5
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for message_id in ids:
            if feed.stop:
                return
            payload = orjson.dumps({"id": message_id, "product": {"title": message_id}})
            info = client.publish(f"{PREFIX}/in/products", payload, qos=1)
            info.wait_for_publish(timeout=10)
            if not info.is_published():
                raise RuntimeError(f"the broker did not acknowledge {message_id}")
            with feed.changed:
                feed.mqtt_acked.append(message_id)
            time.sleep(interval_s)
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def _simulator(render_s: float) -> Iterator[SimulatorProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "service", "simulator", "--port", str(port)]
    run = ChildProcess([*argv, "--render-seconds", str(render_s)], name=f"simulator :{port}")
    try:
        if not run.wait_for_text("simulator_listening"):
            raise RuntimeError(f"the simulator did not start\n{run.tail()}")
        simulator = SimulatorProcess(run, f"http://127.0.0.1:{port}")
        simulator.set_knobs(render_jitter=JITTER)
        yield simulator
    finally:
        run.kill()


def _device_job_id(message_id: str) -> str:
    return job_id_for(DEVICE_SOURCE, f"j:{message_id}", DEVICE_ROUTE)


@dataclass
class Outcome:
    """Where the soak ended: per acknowledged job, its billed exports and ready lines."""

    jobs: list[str]
    billed: dict[str, int]
    ready: dict[str, int]
    states: dict[str, str]
    seconds_after_restart: float
    timed_out: bool

    @property
    def billed_twice(self) -> list[str]:
        return [job for job in self.jobs if self.billed.get(job, 0) > 1]

    @property
    def missing(self) -> list[str]:
        return [j for j in self.jobs if self.billed.get(j, 0) != 1 or not self.ready.get(j)]


def _settle(
    daemon: Daemon, simulator: SimulatorProcess, jobs: list[str], videos: Path, limit_s: float
) -> Outcome:
    """Wait (reading the store and the simulator) until every job is done, twice-billed, or late."""
    restarted_at = time.monotonic()
    while True:
        elapsed = time.monotonic() - restarted_at
        billed = simulator.exports_per_job(jobs)
        ready = ready_lines(videos)
        states = job_states(daemon.db_path)
        outcome = Outcome(jobs, billed, ready, states, elapsed, timed_out=elapsed > limit_s)
        if outcome.billed_twice or not outcome.missing or outcome.timed_out:
            return outcome
        time.sleep(0.25)


def _state_counts(states: dict[str, str], jobs: list[str]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        state = states.get(job, "absent")
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items()))


def soak(args: argparse.Namespace, tmp: Path) -> int:
    """The whole soak; the exit status."""
    rng = random.Random(args.seed)
    mqtt_count = args.events * args.mqtt_share // 100
    webhook_ids = [f"soak-h{i:04d}-{args.seed}" for i in range(args.events - mqtt_count)]
    mqtt_ids = [f"soak-m{i:04d}-{args.seed}" for i in range(mqtt_count)]
    kill_phase_s = args.kills * 1.4  # mean uptime between kills, plus the restart
    broker = PrivateBroker(tmp / "broker")
    broker.start()
    feed = Feed()
    lost = {"drafts": 0, "exports": 0}
    try:
        with _simulator(args.render) as simulator:
            config = daemon_config(
                tmp,
                api_url=simulator.url,
                render_seconds=args.render,
                max_concurrent_exports=args.slots,
                mqtt_port=broker.port,
                mqtt_prefix=PREFIX,
            )
            (tmp / "config.toml").write_text(config)
            daemon = Daemon(tmp / "config.toml", tmp / "state")
            try:
                return _run(
                    args=args, rng=rng, daemon=daemon, simulator=simulator, broker=broker,
                    feed=feed, lost=lost, webhook_ids=webhook_ids, mqtt_ids=mqtt_ids,
                    kill_phase_s=kill_phase_s, tmp=tmp,
                )  # fmt: skip
            finally:
                feed.stop = True
                daemon.kill_all()
    finally:
        broker.kill()


def _run(  # the soak's parts, wired once
    *,
    args: argparse.Namespace,
    rng: random.Random,
    daemon: Daemon,
    simulator: SimulatorProcess,
    broker: PrivateBroker,
    feed: Feed,
    lost: dict[str, int],
    webhook_ids: list[str],
    mqtt_ids: list[str],
    kill_phase_s: float,
    tmp: Path,
) -> int:
    senders = [
        threading.Thread(
            target=_send_webhooks,
            args=(feed, webhook_ids, kill_phase_s / max(len(webhook_ids), 1)),
            daemon=True,
        ),
        threading.Thread(
            target=_publish_mqtt,
            args=(feed, broker, mqtt_ids, kill_phase_s / max(len(mqtt_ids), 1)),
            daemon=True,
        ),
    ]
    started = time.monotonic()
    kill_log: list[tuple[float, int, int]] = []
    for number in range(args.kills):
        simulator.set_knobs(
            lose_response_next_drafts=LOST_PER_RUN, lose_response_next_exports=LOST_PER_RUN
        )
        url = daemon.start()
        if url is None:
            raise RuntimeError(f"run {number + 1} did not start")
        feed.set_url(url)
        if number == 0:
            for sender in senders:
                sender.start()
        time.sleep(rng.uniform(0.3, 2.5))
        daemon.current.send(signal.SIGKILL)  # the senders go on: some hit the dying daemon
        if daemon.current.wait_exit() != -signal.SIGKILL:
            raise RuntimeError(f"run {number + 1} ended by itself\n{daemon.current.tail()}")
        feed.set_url(None)
        knobs = simulator.state()["knobs"]
        lost["drafts"] += LOST_PER_RUN - int(knobs["lose_response_next_drafts"])
        lost["exports"] += LOST_PER_RUN - int(knobs["lose_response_next_exports"])
        with feed.changed:
            acked = len(feed.webhooks_acked) + len(feed.mqtt_acked)
        kill_log.append((time.monotonic() - started, acked, len(job_states(daemon.db_path))))
        say(f"kill {number + 1:>2}: {kill_log[-1][0]:6.1f} s, {acked} events acknowledged")

    simulator.set_knobs(lose_response_next_drafts=0, lose_response_next_exports=0)
    url = daemon.start()
    if url is None:
        raise RuntimeError("the last run did not start")
    feed.set_url(url)
    say("last restart: the rest of the events, then every job to its video.ready ...")
    for sender in senders:
        sender.join(timeout=120)
    with feed.changed:
        jobs = [shop_job_id(i) for i in feed.webhooks_acked]
        jobs += [_device_job_id(i) for i in feed.mqtt_acked]
    limit_s = 60 + 5 * args.render
    outcome = _settle(daemon, simulator, jobs, tmp / "videos.jsonl", limit_s)
    return _report(
        args=args, outcome=outcome, feed=feed, kill_log=kill_log, lost=lost,
        limit_s=limit_s, simulator=simulator,
    )  # fmt: skip


def _report(  # one table of everything the soak saw
    *,
    args: argparse.Namespace,
    outcome: Outcome,
    feed: Feed,
    kill_log: list[tuple[float, int, int]],
    lost: dict[str, int],
    limit_s: float,
    simulator: SimulatorProcess,
) -> int:
    all_billed = simulator.state()["billed_by_name"]
    twice_anywhere = sorted(name for name, n in all_billed.items() if n > 1)
    rows = [
        ("events acknowledged (webhooks / MQTT)", len(outcome.jobs),
         f"{len(feed.webhooks_acked)} / {len(feed.mqtt_acked)}"),
        ("webhooks sent again after a kill", feed.resent, "-"),
        ("kill -9", len(kill_log), f"at {', '.join(f'{t:.1f}' for t, _, _ in kill_log)} s"),
        ("lost responses injected (drafts / exports)", lost["drafts"] + lost["exports"],
         f"{lost['drafts']} / {lost['exports']}"),
        ("jobs with exactly one billed export", sum(
            1 for j in outcome.jobs if outcome.billed.get(j, 0) == 1), f"of {len(outcome.jobs)}"),
        ("jobs billed twice (any name)", len(twice_anywhere), "must be 0"),
        ("jobs with a video.ready", sum(1 for j in outcome.jobs if outcome.ready.get(j)),
         f"of {len(outcome.jobs)}"),
        ("last restart -> all done (s)", round(outcome.seconds_after_restart, 1),
         f"limit 60 + 5 x {args.render:g} = {limit_s:g}"),
    ]  # fmt: skip
    print_table(
        f"crash soak: {args.events} events, {args.kills} x kill -9, renders {args.render:g} s "
        f"+- {JITTER:.0%}, {args.slots} render slots",
        ["figure", "value", "detail"],
        rows,
    )
    failures = []
    if twice_anywhere or outcome.billed_twice:
        failures.append(f"billed twice: {twice_anywhere or outcome.billed_twice}")
    if outcome.missing:
        failures.append(
            f"{len(outcome.missing)} jobs without exactly one billed export and a video.ready "
            f"({_state_counts(outcome.states, outcome.missing)})"
        )
    if outcome.timed_out:
        failures.append(f"not done within {limit_s:g} s of the last restart")
    if len(kill_log) < args.kills or lost["drafts"] == 0 or lost["exports"] == 0:
        failures.append("the kills or the lost responses did not all happen")
    for failure in failures:
        print(f"FAIL: {failure}")
    emit_result(
        "crash_soak",
        {
            "events": len(outcome.jobs),
            "webhooks": len(feed.webhooks_acked),
            "mqtt": len(feed.mqtt_acked),
            "kills": len(kill_log),
            "lost_drafts": lost["drafts"],
            "lost_exports": lost["exports"],
            "billed_twice": len(twice_anywhere),
            "missing": len(outcome.missing),
            "seconds_after_last_restart": round(outcome.seconds_after_restart, 2),
            "limit_s": limit_s,
            "ok": not failures,
        },
    )
    return 1 if failures else 0


def main() -> None:
    """`python bench/crash_soak.py [--quick] [--events N] [--kills K] [--render R]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="120 events, 10 kills, 1 s renders")
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--mqtt-share", type=int, default=40, help="percent sent over MQTT")
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--render", type=float, default=2.0, help="render length, seconds")
    parser.add_argument("--slots", type=int, default=32, help="max_concurrent_exports")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store)")
    args = parser.parse_args()
    if args.quick:
        args.events, args.kills, args.render = 120, 10, 1.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        status = soak(args, tmp)
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
