"""Durable MQTT QoS 1 intake, beside a subscriber that acknowledges without storing, same run.

A Mosquitto of its own (Debian `mosquitto`, on a free loopback port, no persistence: the
broker is not what is measured) and a publisher in a separate process (paho-mqtt, QoS 1, up
to 1,000 PUBLISHes in flight). N messages are published at once (5,000; `--quick` 1,000),
each `examples/mqtt-product.json` with its own `id`, on the shipped `devices` source's topic.
The clock runs from the publisher's "go" to the moment the subscriber has acknowledged the
N-th message.

  baseline    an aiomqtt subscriber with the same session settings (MQTT 5, persistent
              session, manual ack, Receive Maximum from the shipped config) that sends each
              PUBACK as soon as the message arrives, in arrival order; nothing is stored.
  studiohook  MqttIngress + StoreIntake + SQLiteStore (WAL, synchronous=FULL, group commit),
              the shipped config (`devices` source, dedupe on `id`, `device-product` route):
              each message's inbox row and job are committed before its PUBACK.

Each side first gets a warm-up of N/10 messages, not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import multiprocessing
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import orjson
from _shared import (
    ROOT,
    configure_bench_logging,
    emit_result,
    print_table,
    ratio,
    say,
    shipped_catalog,
    shipped_config,
)
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from service.config import Config, SourceConfig
from service.eventloop import loop_options, tune_collector
from service.ingress.mqtt import MqttIngress
from service.intake import StoreIntake
from service.model import Acceptance, JobState, RawEvent
from service.store.sqlite import SQLiteStore

FULL_N, QUICK_N = 5000, 1000
WARMUP_FRACTION = 10
TOPIC = "studiohook/in/products/bench"
TIMEOUT_S = 120.0
_SAMPLE = ROOT / "examples" / "mqtt-product.json"


# --- the broker ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto on a free port; returns once it accepts connections."""
    port = _free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
        f"user {getpass.getuser()}\n",
        encoding="utf-8",
    )
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen(
        [mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("mosquitto did not start")
        time.sleep(0.02)  # polling a port: there is no event to await
    return process, port


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


# --- the publisher process ----------------------------------------------------------------


def publisher_main(port: int, batches: list[tuple[int, int]], conn: Connection) -> None:
    """Publish each batch (first index, count) when told to; report when all are PUBACKed."""
    sample = orjson.loads(_SAMPLE.read_bytes())
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{port}", protocol=MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for first, count in batches:
            bodies = []
            for i in range(first, first + count):
                sample["id"] = f"bench-{port}-{i}"
                bodies.append(orjson.dumps(sample))
            conn.recv()  # "go"
            started = time.perf_counter()
            infos = [client.publish(TOPIC, body, qos=1) for body in bodies]
            for info in infos:
                info.wait_for_publish(timeout=TIMEOUT_S)
            conn.send(time.perf_counter() - started)
    finally:
        client.loop_stop()
        client.disconnect()


# --- the subscribers ----------------------------------------------------------------------


class CountingIntake(StoreIntake):
    """The real intake; wakes the bench once `target` accepts have returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted = 0
        self.target = 0
        self.reached = anyio.Event()

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        acceptance = await super().accept(source, raw, body)
        self.accepted += 1
        if self.accepted >= self.target:
            self.reached.set()
        return acceptance


async def _bare_subscriber(cfg: Config, port: int, counter: dict[str, Any]) -> None:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = cfg.mqtt.session_expiry_seconds
    properties.ReceiveMaximum = cfg.mqtt.receive_maximum
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"bench-bare-{secrets.token_hex(4)}",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )
    # The same internals studiohook's ingress uses: aiomqtt 2.x has no public manual ack.
    client._client.manual_ack_set(on=True)  # noqa: SLF001
    async with client:
        await client.subscribe(TOPIC, qos=1)
        counter["subscribed"].set()
        async for message in client.messages:
            client._client.ack(message.mid, message.qos)  # noqa: SLF001
            counter["n"] += 1
            if counter["n"] >= counter["target"]:
                counter["reached"].set()


async def _timed(conn: Connection, reached: Any) -> tuple[float, float]:
    """Say "go", wait for `reached`; return (subscriber seconds, publisher seconds)."""
    started = time.perf_counter()
    conn.send("go")
    with anyio.fail_after(TIMEOUT_S):
        await reached.wait()
    elapsed = time.perf_counter() - started
    while not conn.poll():
        await anyio.sleep(0.01)
    return elapsed, float(conn.recv())


async def run(count: int, loop_name: str) -> dict[str, Any]:
    """Baseline first, then studiohook, each with a warm-up and a timed burst."""
    warmup = max(count // WARMUP_FRACTION, 1)
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        directory = Path(tmp)
        broker, port = start_broker(directory)
        cfg = shipped_config(directory / "state", secrets.token_hex(8))
        cfg = dataclasses.replace(
            cfg,
            mqtt=dataclasses.replace(
                cfg.mqtt, host="127.0.0.1", port=port, client_id=f"bench-{port}"
            ),
        )
        configure_bench_logging(directory / "service.log")
        catalog = await shipped_catalog(cfg)
        batches = [
            (0, warmup),
            (warmup, count),
            (warmup + count, warmup),
            (2 * warmup + count, count),
        ]
        context = multiprocessing.get_context("spawn")
        ours_end, theirs = context.Pipe()
        publisher = context.Process(
            target=publisher_main, args=(port, batches, theirs), daemon=True
        )
        publisher.start()
        say(f"event loop: {loop_name}; {count} QoS 1 messages per side (+{warmup} warm-up)")
        try:
            say("baseline: aiomqtt subscriber that acks on arrival, stores nothing")
            baseline = await _run_baseline(cfg, port, ours_end, warmup, count)
            say("studiohook: MqttIngress + StoreIntake + SQLiteStore (group commit)")
            ours, stored, commits, writes = await _run_studiohook(
                cfg, catalog, directory, ours_end, warmup, count
            )
        finally:
            publisher.join(timeout=10)
            if publisher.is_alive():
                publisher.terminate()
            broker.terminate()
            broker.wait(timeout=10)
    return _report(count, warmup, loop_name, baseline, ours, stored, commits, writes)


async def _run_baseline(
    cfg: Config, port: int, conn: Connection, warmup: int, count: int
) -> tuple[float, float]:
    counter: dict[str, Any] = {"n": 0, "target": warmup, "reached": anyio.Event()}
    counter["subscribed"] = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_bare_subscriber, cfg, port, counter)
        await counter["subscribed"].wait()
        await _timed(conn, counter["reached"])
        counter.update(n=0, target=count, reached=anyio.Event())
        timed = await _timed(conn, counter["reached"])
        tg.cancel_scope.cancel()
    return timed


async def _run_studiohook(  # noqa: PLR0917 - the bench's own plumbing
    cfg: Config, catalog: Any, directory: Path, conn: Connection, warmup: int, count: int
) -> tuple[tuple[float, float], int, int, int]:
    store = SQLiteStore(directory / "state" / "studiohook.db")
    await store.open()
    try:
        intake = CountingIntake(store, catalog)
        intake.target = warmup
        ingress = MqttIngress(config=cfg.mqtt, sources=cfg.sources, intake=intake)
        async with anyio.create_task_group() as tg:
            await tg.start(ingress.run)
            await _timed(conn, intake.reached)
            intake.accepted, intake.target, intake.reached = 0, count, anyio.Event()
            commits0, writes0 = store.commit_count, store.write_count
            timed = await _timed(conn, intake.reached)
            commits, writes = store.commit_count - commits0, store.write_count - writes0
            tg.cancel_scope.cancel()
        stored = (await store.count_jobs_by_state())[JobState.RECEIVED]
    finally:
        await store.close()
    return timed, stored, commits, writes


def _report(  # noqa: PLR0917 - the bench's own plumbing
    count: int,
    warmup: int,
    loop_name: str,
    baseline: tuple[float, float],
    ours: tuple[float, float],
    stored: int,
    commits: int,
    writes: int,
) -> dict[str, Any]:
    ours_rate, base_rate = count / ours[0], count / baseline[0]
    print_table(
        f"MQTT QoS 1 intake: {count} messages published at once, event loop {loop_name}",
        ["figure", "studiohook", "baseline", "ratio"],
        [
            (
                "messages/s (publish start -> last ack)",
                ours_rate,
                base_rate,
                ratio(ours_rate, base_rate),
            ),
            ("seconds for the burst", ours[0], baseline[0], ratio(ours[0], baseline[0])),
            (
                "publisher's own seconds (all PUBACKs back)",
                ours[1],
                baseline[1],
                ratio(ours[1], baseline[1]),
            ),
        ],
    )
    print_table(
        "studiohook store during the timed burst",
        ["figure", "value"],
        [
            ("write requests", writes),
            ("transactions committed (fsyncs)", commits),
            ("writes per commit (batching factor)", ratio(writes, commits)),
            ("jobs stored (warm-up included)", stored),
        ],
    )
    return {
        "loop": loop_name,
        "messages": count,
        "warmup": warmup,
        "studiohook_msg_per_s": round(ours_rate, 1),
        "baseline_msg_per_s": round(base_rate, 1),
        "rate_ratio": round(ratio(ours_rate, base_rate), 3),
        "commit_count": commits,
        "write_count": writes,
        "batching_factor": round(ratio(writes, commits), 2),
        "jobs_stored": stored,
    }


def main() -> None:
    """`python bench/mqtt_intake.py [--quick] [--loop asyncio]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N} messages, not {FULL_N}")
    parser.add_argument("--loop", choices=["default", "asyncio"], default="default")
    args = parser.parse_args()
    count = QUICK_N if args.quick else FULL_N
    options, loop_name = loop_options(prefer_uvloop=args.loop == "default")
    tune_collector()  # as `studiohook serve` does
    figures = anyio.run(run, count, loop_name, backend_options=options)
    emit_result("mqtt_intake", figures)


if __name__ == "__main__":
    main()
