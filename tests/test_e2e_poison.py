"""The daemon as a real process against a poison MQTT message, a broker that goes away, and json logs.

The reported crash: an MQTT source with `dedupe_key = "length(id)"` (valid JMESPath, accepted by
`check`) received `{"id": 5}`; JMESPath raised, the intake task died with the daemon, the
un-acked message came back after every restart. Here the daemon keeps running, acknowledges the
poison once, and the messages after it become jobs.
"""

from __future__ import annotations

import signal
import uuid

import orjson
import paho.mqtt.client as paho
import pytest

from tests.support.daemon_fixtures import (
    DEVICE_SOURCE,
    daemon_config,
    inbox_keys,
    job_states,
    read_only,
    wait_until,
)

pytestmark = pytest.mark.integration


def publish(port: int, topic: str, *payloads: object) -> None:
    """Publish with QoS 1 and wait for each PUBACK (a plain paho client: no loop needed)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, orjson.dumps(payload), qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def assert_every_line_is_json(lines: list[str]) -> None:
    assert lines, "the daemon wrote nothing"
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict), line


def assert_nothing_never_retrieved(lines: list[str]) -> None:
    offending = [line for line in lines if "never retrieved" in line]
    assert offending == [], offending


def poison_config(tmp_path, port: int, prefix: str) -> str:
    # The reported expression; the good messages have ids of different lengths so that
    # `length(id)` keeps them apart.
    # An MQTT notify target too: the run announces a burst of videos on the bus.
    bus = f'\n[[notify]]\nname = "bus"\nkind = "mqtt"\ntopic = "{prefix}/videos/{{job_id}}"\n'
    config = daemon_config(tmp_path, mqtt_port=port, mqtt_prefix=prefix, max_concurrent_exports=8)
    return config.replace('dedupe_key = "id"', 'dedupe_key = "length(id)"') + bus


def dead_letters(db_path) -> list[tuple[str, str, str]]:
    with read_only(db_path) as db:
        return db.execute(
            "SELECT event_id, failed_step, reason FROM events WHERE status = 'dead_lettered'"
        ).fetchall()


def test_a_poison_message_is_dead_lettered_once_and_the_messages_after_it_flow(
    tmp_path, mqtt_broker, daemon_factory
):
    prefix = f"poison-{uuid.uuid4().hex[:8]}"
    daemon = daemon_factory(poison_config(tmp_path, mqtt_broker.port, prefix))
    assert daemon.start() is not None
    good = [{"id": "a" * n, "title": f"Lamp {n}"} for n in range(1, 13)]
    publish(mqtt_broker.port, f"{prefix}/in/lamps", {"id": 5, "title": "poison"}, *good)

    def all_notified() -> bool:
        states = job_states(daemon.db_path)
        return len(states) == len(good) and set(states.values()) == {"notified"}

    wait_until(all_notified, what="the good jobs notified", explain=daemon.current.tail)
    (poison,) = dead_letters(daemon.db_path)
    assert poison[1] == "dedupe_key"
    assert "JMESPathTypeError" in poison[2]
    warned = daemon.current.events("event.dead_lettered")
    assert [w["event_id"] for w in warned] == [poison[0]]
    assert warned[0]["level"] == "warning"
    daemon.current.send(signal.SIGTERM)
    assert daemon.current.wait_exit() == 0

    # After a restart, the poison is not handed over again: it was acknowledged once, after
    # its dead letter was committed. The sentinel published meanwhile arrives alone.
    assert daemon.start() is not None
    publish(mqtt_broker.port, f"{prefix}/in/lamps", {"id": "s" * 20, "title": "Sentinel"})
    sentinel = daemon.current.wait_for(
        lambda r: r.get("event") == "mqtt message accepted", what="the sentinel"
    )
    assert sentinel is not None
    assert sentinel["event_id"] == "s" * 20
    daemon.current.send(signal.SIGTERM)
    assert daemon.current.wait_exit() == 0
    accepted_again = daemon.current.events("mqtt message accepted")
    assert [r["event_id"] for r in accepted_again] == ["s" * 20]
    keys = inbox_keys(daemon.db_path, DEVICE_SOURCE)
    assert list(keys.values()) == [1] * (len(good) + 2)  # poison, good ones, sentinel: once each
    for run in daemon.runs:
        assert_every_line_is_json(run.lines)
        assert_nothing_never_retrieved(run.lines)


def test_sigterm_during_an_mqtt_reconnect_stops_cleanly_without_unretrieved_futures(
    tmp_path, private_broker, daemon_factory
):
    broker = private_broker()
    prefix = f"reconnect-{uuid.uuid4().hex[:8]}"
    config = daemon_config(tmp_path, mqtt_port=broker.port, mqtt_prefix=prefix) + (
        f'\n[[notify]]\nname = "bus"\nkind = "mqtt"\ntopic = "{prefix}/videos/{{job_id}}"\n'
    )
    daemon = daemon_factory(config)
    assert daemon.start() is not None
    # One announcement, so the notifier holds an idle connection of its own as well.
    publish(broker.port, f"{prefix}/in/lamps", {"id": "r1", "title": "Lamp"})
    wait_until(
        lambda: set(job_states(daemon.db_path).values()) == {"notified"},
        what="the job announced",
        explain=daemon.current.tail,
    )
    broker.stop()  # both connections drop under the daemon: the ingress starts reconnecting
    reconnecting = daemon.current.wait_for(
        lambda r: r.get("event") == "mqtt reconnecting", what="a reconnect attempt"
    )
    assert reconnecting is not None
    daemon.current.send(signal.SIGTERM)
    assert daemon.current.wait_exit() == 0
    assert daemon.current.events("service.stopped")
    assert_nothing_never_retrieved(daemon.current.lines)
    assert_every_line_is_json(daemon.current.lines)
