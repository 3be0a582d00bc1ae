"""MqttIngress against real Mosquitto brokers, committing to a real SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import anyio
import anyio.lowlevel
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs

from service.config import MqttConfig, SourceConfig
from service.ingress.mqtt import MqttIngress, arrived_queue
from service.ingress.mqtt_socket import (
    ReadAhead,
    quick_publishes,
    read_ahead,
    register_writes_in_step,
)
from service.model import Acceptance, EventStatus, RawEvent
from service.store.base import StoreUnavailableError
from tests.support.mqtt_fixtures import BrokerAddress, PrivateBroker

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

WAIT_S = 15


class SqliteIntake:
    """A small real intake: one SQLite row per (source, dedupe key), calls recorded in order.

    `gates` hold a commit until its event is set; `fail_next` makes the next commits raise
    StoreUnavailableError, like a full disk.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE events (source TEXT, dedupe_key TEXT, topic TEXT, body BLOB,"
            " headers TEXT, reason TEXT, UNIQUE (source, dedupe_key))"
        )
        self._db.commit()
        self.calls: list[str] = []
        self.committed: list[str] = []
        self.gates: dict[str, anyio.Event] = {}
        self.fail_next = 0
        self.concurrent = 0
        self.most_concurrent = 0
        self._changed = anyio.Event()

    @staticmethod
    def key_of(payload: object, topic: str | None, body: bytes) -> str:
        if isinstance(payload, dict) and "id" in payload:
            return str(payload["id"])
        return hashlib.sha256((topic or "").encode() + b"\x00" + body).hexdigest()[:16]

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        key = self.key_of(raw.payload, raw.topic, body)
        return await self._commit(source, key, topic=raw.topic, body=body, headers=raw.headers)

    async def dead_letter(
        self,
        source: SourceConfig,
        body: bytes,
        headers: Mapping[str, str],
        reason: str,
        topic: str | None = None,
    ) -> Acceptance:
        key = self.key_of(None, topic, body)
        return await self._commit(
            source, key, topic=topic, body=body, headers=headers, reason=reason
        )

    async def _commit(
        self,
        source: SourceConfig,
        key: str,
        *,
        topic: str | None,
        body: bytes,
        headers: Mapping[str, str],
        reason: str | None = None,
    ) -> Acceptance:
        self.calls.append(key)
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            if key in self.gates:
                await self.gates[key].wait()
            if self.fail_next > 0:
                self.fail_next -= 1
                raise StoreUnavailableError("test store is down")
            await anyio.lowlevel.checkpoint()
        finally:
            self.concurrent -= 1
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?)",
            (source.name, key, topic, body, orjson.dumps(dict(headers)).decode(), reason),
        )
        self._db.commit()
        duplicate = cursor.rowcount == 0
        if not duplicate:
            self.committed.append(key)
        self._notify()
        status = EventStatus.DEAD_LETTERED if reason else EventStatus.IGNORED
        return Acceptance(event_id=key, job_ids=(), duplicate=duplicate, status=status)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT_S):
            while not predicate():
                await self._changed.wait()

    async def wait_committed(self, keys: Iterable[str]) -> None:
        wanted = set(keys)
        await self.wait_until(lambda: wanted <= set(self.committed))

    def rows(self) -> list[tuple[str, str, str | None, bytes, str, str | None]]:
        return self._db.execute("SELECT * FROM events ORDER BY rowid").fetchall()

    def close(self) -> None:
        self._db.close()


@pytest.fixture
def intake(tmp_path):
    store = SqliteIntake(tmp_path / "inbox.sqlite3")
    yield store
    store.close()


def mqtt_config(address: BrokerAddress, client_id: str, **extra: object) -> MqttConfig:
    values: dict[str, object] = {
        "session_expiry_seconds": 60,
        "receive_maximum": 50,
        **extra,
    }
    return MqttConfig(
        url=f"mqtt://{address.host}:{address.port}",
        host=address.host,
        port=address.port,
        client_id=client_id,
        **values,  # type: ignore[arg-type]
    )


class Setup:
    """One test's broker, topic namespace, client id and intake."""

    def __init__(self, address: BrokerAddress, intake: SqliteIntake, **config: object) -> None:
        self.address = address
        self.intake = intake
        self.prefix = f"studiohook-test/{uuid.uuid4().hex[:10]}"
        self.source = SourceConfig(name="sensors", kind="mqtt", topic=f"{self.prefix}/+/events")
        self.config = mqtt_config(address, f"studiohook-test-{uuid.uuid4().hex[:10]}", **config)

    def topic(self, device: str = "dev1") -> str:
        return f"{self.prefix}/{device}/events"

    def ingress(self, **kwargs: float) -> MqttIngress:
        return MqttIngress(
            config=self.config,
            sources=[self.source, SourceConfig(name="hooks", kind="shopify")],
            intake=self.intake,
            backoff_min_s=kwargs.pop("backoff_min_s", 0.02),
            backoff_max_s=kwargs.pop("backoff_max_s", 0.2),
            **kwargs,  # type: ignore[arg-type]
        )

    @asynccontextmanager
    async def running(self, **kwargs: float) -> AsyncIterator[MqttIngress]:
        ingress = self.ingress(**kwargs)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(WAIT_S):
                await tg.start(ingress.run)
            assert ingress.connected
            yield ingress
            tg.cancel_scope.cancel()

    async def publish(self, *payloads: bytes | Mapping[str, object], **props: str) -> None:
        async with aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=f"publisher-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as publisher:
            for payload in payloads:
                body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
                properties = None
                if props:
                    properties = Properties(PacketTypes.PUBLISH)
                    properties.UserProperty = list(props.items())
                await publisher.publish(self.topic(), body, qos=1, properties=properties)

    async def assert_nothing_redelivered(self, *, expect_calls: list[str]) -> None:
        """Restart the ingress and let a sentinel through: anything un-acked would come first."""
        sentinel = f"sentinel-{uuid.uuid4().hex[:6]}"
        await self.publish({"id": sentinel})
        async with self.running():
            await self.intake.wait_committed([sentinel])
        assert self.intake.calls == [*expect_calls, sentinel]


async def test_commit_then_ack_is_not_redelivered_and_headers_reach_the_intake(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    with capture_logs() as logs:
        async with setup.running():
            await setup.publish({"id": "m1", "sku": "A-1"}, **{"X-Event-Type": "product.created"})
            await intake.wait_committed(["m1"])
    (row,) = intake.rows()
    assert row[:3] == ("sensors", "m1", setup.topic())
    assert orjson.loads(row[3]) == {"id": "m1", "sku": "A-1"}
    assert orjson.loads(row[4]) == {"x-event-type": "product.created"}
    accepted = [e for e in logs if e["event"] == "mqtt message accepted"]
    assert accepted == [
        {
            "event": "mqtt message accepted",
            "log_level": "info",
            "component": "ingress.mqtt",
            "source": "sensors",
            "topic": setup.topic(),
            "event_id": "m1",
            "duplicate": False,
            "jobs": 0,
            "outcome": "ignored",
        }
    ]
    await setup.assert_nothing_redelivered(expect_calls=["m1"])


async def test_failed_commit_is_not_acked_but_redelivered_and_committed_once(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake, password="hunter2-secret", username="studiohook")
    intake.fail_next = 2
    with capture_logs() as logs:
        async with setup.running():
            await setup.publish({"id": "m1"})
            await intake.wait_committed(["m1"])
    assert intake.calls == ["m1", "m1", "m1"]
    assert len(intake.rows()) == 1
    reconnects = [e for e in logs if e["event"] == "mqtt reconnecting"]
    assert [e["attempt"] for e in reconnects] == [1, 2]
    assert all("store unavailable" in e["reason"] for e in reconnects)
    assert all(0 <= e["delay_s"] <= 0.2 for e in reconnects)
    assert "hunter2-secret" not in repr(logs)
    await setup.assert_nothing_redelivered(expect_calls=["m1", "m1", "m1"])


async def test_messages_published_while_stopped_arrive_after_restart(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    async with setup.running():
        pass  # the first run creates the persistent session and its subscription
    ids = [f"offline-{i}" for i in range(5)]
    await setup.publish(*({"id": i} for i in ids))
    async with setup.running():
        await intake.wait_committed(ids)
    assert intake.committed == ids


async def test_a_burst_is_committed_in_groups_in_arrival_order_and_all_of_it_acked(
    mqtt_broker, intake
):
    setup = Setup(mqtt_broker, intake)
    async with setup.running():
        pass  # the first run creates the persistent session and its subscription
    ids = [f"burst-{i:03d}" for i in range(300)]
    await setup.publish(*({"id": i} for i in ids))  # queued for the session: handed over at once
    async with setup.running(max_in_flight=40):
        await intake.wait_committed(ids)
    assert intake.calls == ids  # each delivered once, in arrival order
    assert 1 < intake.most_concurrent <= 40  # groups of already-received messages, capped
    await setup.assert_nothing_redelivered(expect_calls=ids)


async def test_a_failed_commit_in_a_group_withholds_every_later_ack(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    async with setup.running():
        pass
    ids = [f"g-{i:02d}" for i in range(30)]
    await setup.publish(*({"id": i} for i in ids))
    intake.gates["g-05"] = anyio.Event()
    async with setup.running():
        await intake.wait_committed([i for i in ids if i != "g-05"])
        intake.fail_next = 1
        intake.gates["g-05"].set()  # g-05 fails now: nothing from it on may be acknowledged
        await intake.wait_committed(ids)  # after the reconnect, the redelivered ones commit
    first_pass = intake.calls[: len(ids)]
    assert first_pass == ids
    redelivered = intake.calls[len(ids) :]
    assert redelivered[: len(ids) - 5] == ids[5:]  # g-05 and everything after it came again
    assert sorted(row[1] for row in intake.rows()) == ids
    await setup.assert_nothing_redelivered(expect_calls=intake.calls.copy())


async def test_acks_wait_for_earlier_commits_and_follow_arrival_order(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    intake.gates["a"] = anyio.Event()
    async with setup.running():
        await setup.publish({"id": "a"}, {"id": "b"}, {"id": "c"})
        # b and c commit while a is held: commits run concurrently ...
        await intake.wait_committed(["b", "c"])
        assert intake.committed == ["b", "c"]
    # ... but were not acked before a: all three come back after a restart.
    intake.gates["a"].set()
    async with setup.running():
        await intake.wait_until(lambda: intake.calls.count("c") == 2)
    assert intake.calls == ["a", "b", "c", "a", "b", "c"]
    assert intake.committed == ["b", "c", "a"]
    await setup.assert_nothing_redelivered(expect_calls=intake.calls.copy())


async def test_out_of_order_commits_are_all_acked_once_the_head_commits(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    intake.gates["a"] = anyio.Event()
    async with setup.running():
        await setup.publish({"id": "a"}, {"id": "b"}, {"id": "c"})
        await intake.wait_committed(["b", "c"])
        intake.gates["a"].set()
        await intake.wait_committed(["a"])
    await setup.assert_nothing_redelivered(expect_calls=["a", "b", "c"])


async def test_unreadable_payloads_are_dead_lettered_with_reason_and_acked(mqtt_broker, intake):
    setup = Setup(mqtt_broker, intake)
    with capture_logs() as logs:
        async with setup.running():
            await setup.publish(b"{not json", b"\xff\xfe", {"id": "good"})
            await intake.wait_committed(["good"])
    reasons = [row[5] for row in intake.rows()]
    assert reasons[0].startswith("payload is not JSON")
    assert reasons[1].startswith("payload is not UTF-8")
    assert reasons[2] is None
    assert [row[3] for row in intake.rows()][:2] == [b"{not json", b"\xff\xfe"]
    rejected = [e for e in logs if e["event"] == "mqtt message dead-lettered"]
    assert [e["source"] for e in rejected] == ["sensors", "sensors"]
    await setup.assert_nothing_redelivered(expect_calls=intake.calls.copy())


async def test_every_message_stored_exactly_once_across_a_broker_restart(private_broker, intake):
    broker: PrivateBroker = private_broker()
    setup = Setup(broker.address, intake)
    first = [f"m{i:03d}" for i in range(150)]
    second = [f"m{i:03d}" for i in range(150, 300)]
    # Hold one commit so the restart hits the ingress mid-stream with un-acked messages.
    intake.gates["m100"] = anyio.Event()
    async with setup.running(max_in_flight=20):
        await setup.publish(*({"id": i} for i in first))
        await intake.wait_until(lambda: "m100" in intake.calls)
        await intake.wait_until(lambda: len(intake.calls) >= 110)
        broker.stop()
        intake.gates["m100"].set()
        broker.start()
        await setup.publish(*({"id": i} for i in second))
        await intake.wait_committed(first + second)
    keys = [row[1] for row in intake.rows()]
    assert sorted(keys) == sorted(first + second)
    assert len(keys) == len(set(keys)) == 300
    assert len(intake.calls) > 300  # un-acked messages were redelivered and deduplicated


def persistent_v5_client(
    broker: BrokerAddress, client_id: str, *, receive_maximum: int | None = None
) -> aiomqtt.Client:
    """A plain aiomqtt client on a persistent MQTT 5 session (the ingress's own settings)."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 60
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )


async def test_aiomqtt_internals_for_manual_ack_still_exist_and_unacked_is_redelivered(
    mqtt_broker,
):
    """Fails loudly if aiomqtt drops the wrapped paho client or paho its manual-ack API."""
    topic = f"studiohook-test/{uuid.uuid4().hex[:10]}/raw"
    client_id = f"studiohook-test-{uuid.uuid4().hex[:10]}"

    def client() -> aiomqtt.Client:
        made = persistent_v5_client(mqtt_broker, client_id)
        assert isinstance(made._client, paho.Client), "aiomqtt no longer wraps paho as _client"
        assert callable(made._client.manual_ack_set), "paho lost Client.manual_ack_set"
        assert callable(made._client.ack), "paho lost Client.ack"
        made._client.manual_ack_set(on=True)
        return made

    async def receive_one() -> aiomqtt.Message:
        with anyio.fail_after(WAIT_S):
            async for message in listener.messages:
                return message
        raise AssertionError("no message")

    listener = client()
    async with listener:
        await listener.subscribe(topic, qos=1)
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as publisher:
            await publisher.publish(topic, b"once", qos=1)
        first = await receive_one()
        assert first.payload == b"once"
    # Not acked: the broker must hand the same message over again on the next connection.
    listener = client()
    async with listener:
        again = await receive_one()
        assert again.payload == b"once"
        assert listener._client.ack(again.mid, again.qos) == paho.MQTT_ERR_SUCCESS
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as publisher:
            await publisher.publish(topic, b"sentinel", qos=1)
        sentinel = await receive_one()
        assert sentinel.payload == b"sentinel"
        listener._client.ack(sentinel.mid, sentinel.qos)
    listener = client()
    async with listener:
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as publisher:
            await publisher.publish(topic, b"last", qos=1)
        last = await receive_one()
        assert last.payload == b"last"  # "once" was acked: it is not redelivered first
        listener._client.ack(last.mid, last.qos)


async def test_a_burst_read_ahead_arrives_whole_in_order_and_acks_written_in_step_reach_it(
    mqtt_broker,
):
    """Fails loudly if aiomqtt drops its message queue, or paho an internal the shims use.

    Read-ahead and quick PUBLISH decoding lose or reorder nothing: 300 messages queued for the session while it was
    away arrive at once, in publishing order; the PUBACKs, written through the writer that
    `register_writes_in_step` registers, reach the broker: none is handed over again.
    """
    topic = f"studiohook-test/{uuid.uuid4().hex[:10]}/burst"
    client_id = f"studiohook-test-{uuid.uuid4().hex[:10]}"

    def client() -> aiomqtt.Client:
        made = persistent_v5_client(mqtt_broker, client_id, receive_maximum=1000)
        made._client.manual_ack_set(on=True)
        return made

    async def publish(*bodies: bytes) -> None:
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as publisher:
            for body in bodies:
                await publisher.publish(topic, body, qos=1)

    async with client() as listener:
        await listener.subscribe(topic, qos=1)
    await publish(*(f"m{i:03d}".encode() * 40 for i in range(300)))
    received: list[aiomqtt.Message] = []
    async with client() as listener:
        assert listener._client._sock is not None, "paho no longer keeps its socket as _sock"
        for name in ("_in_packet", "_in_callback_mutex", "_userdata", "_manual_ack", "_protocol"):
            assert hasattr(listener._client, name), f"paho no longer has Client.{name}"
        register_writes_in_step(listener)
        read_ahead(listener)
        quick_publishes(listener)
        assert isinstance(listener._client._sock, ReadAhead)
        assert "_handle_publish" in vars(listener._client), "quick publishes not installed"
        assert not list(listener._client._on_message_filtered.iter_match(topic))
        queued = arrived_queue(listener)
        assert isinstance(queued, asyncio.Queue)
        with anyio.fail_after(WAIT_S):
            async for message in listener.messages:
                received.append(message)
                while not queued.empty():
                    received.append(queued.get_nowait())
                if len(received) >= 300:
                    break
        for message in received:
            assert listener._client.ack(message.mid, message.qos) == paho.MQTT_ERR_SUCCESS
    assert [m.payload for m in received] == [f"m{i:03d}".encode() * 40 for i in range(300)]
    await publish(b"sentinel")
    async with client() as listener:
        with anyio.fail_after(WAIT_S):
            async for message in listener.messages:
                assert message.payload == b"sentinel"  # nothing of the burst came back first
                listener._client.ack(message.mid, message.qos)
                break
