"""MQTT target against the real Mosquitto broker on 127.0.0.1:1883."""

import socket
from contextlib import aclosing

import aiomqtt
import anyio
import orjson
import pytest
from structlog.testing import capture_logs

from service.config import MqttConfig, NotifyConfig
from service.model import OutboxMessage
from service.notify.mqtt import MqttNotifier, render_topic, topic_template_problem
from service.notify.payload import ready_payload
from service.notify.sender import DeliveryError
from tests.support.notify_fixtures import ready_job

BROKER = ("127.0.0.1", 1883)


@pytest.fixture
def broker() -> MqttConfig:
    try:
        socket.create_connection(BROKER, timeout=0.5).close()
    except OSError:
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    return MqttConfig(url="mqtt://127.0.0.1:1883", host=BROKER[0], port=BROKER[1])


def message(job_id: str) -> OutboxMessage:
    job = ready_job(job_id=job_id, event_id="evt_1")
    return OutboxMessage(
        id=1,
        job_id=job_id,
        target="bus",
        event_type="video.ready",
        payload=ready_payload(job),
    )


def test_topic_template_placeholders():
    fields = {"route": "r", "job_id": "j", "source": "s", "event_type": "video.ready"}
    assert render_topic("studiohook/videos/{route}/{job_id}", **fields) == "studiohook/videos/r/j"
    assert render_topic("{source}/{event_type}/{event}", **fields) == "s/video_ready/ready"
    with pytest.raises(ValueError, match="bad topic template"):
        render_topic("x/{nope}", **fields)
    with pytest.raises(ValueError, match="wildcard"):
        render_topic("x/#", **fields)


def test_topic_template_problem_accepts_every_placeholder():
    assert topic_template_problem("studiohook/videos/{route}/{job_id}") is None
    assert topic_template_problem("{source}/{event_type}/{event}") is None
    assert topic_template_problem("fixed/topic") is None


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("x/{nope}", "unknown placeholder {nope}"),
        ("x/{}", "unknown placeholder {}"),
        ("x/{0}", "unknown placeholder {0}"),
        ("x/{route", "bad topic template"),
        ("x/{route:d}", "bad topic template"),
        ("x/#", "wildcard"),
        ("{route}/+/{job_id}", "wildcard"),
        ("", "empty"),
    ],
)
def test_topic_template_problem_names_what_would_fail_every_publish(template, expected):
    problem = topic_template_problem(template)
    assert problem is not None
    assert expected in problem
    with pytest.raises(ValueError):  # the sender would refuse the same template
        render_topic(template, route="r", job_id="j", source="s", event_type="video.ready")


def test_an_unknown_placeholder_problem_lists_the_allowed_ones():
    problem = topic_template_problem("t/{customer}")
    assert problem is not None
    assert "{event}, {event_type}, {job_id}, {route}, {source}" in problem


@pytest.mark.integration
@pytest.mark.anyio
async def test_subscriber_receives_the_payload_at_the_default_topic_with_qos1(broker, tmp_path):
    job_id = f"job_mqtt_{tmp_path.name}"
    topic = f"studiohook/videos/new-product/{job_id}"
    async with aiomqtt.Client(BROKER[0], BROKER[1], identifier=f"sub-{job_id}") as sub:
        await sub.subscribe(topic, qos=1)
        target = NotifyConfig(name="bus", kind="mqtt")
        async with aclosing(MqttNotifier(target, broker)) as notifier:
            await notifier.deliver(message(job_id))
        with anyio.fail_after(5):
            received = await anext(aiter(sub.messages))
    assert received.topic.value == topic
    assert received.qos == 1
    assert not received.retain
    assert orjson.loads(received.payload)["job_id"] == job_id
    assert received.payload == message(job_id).payload


@pytest.mark.integration
@pytest.mark.anyio
async def test_reconnects_after_the_connection_is_lost(broker, tmp_path):
    job_id = f"job_reconnect_{tmp_path.name}"
    target = NotifyConfig(name="bus", kind="mqtt", topic="t/{job_id}")
    async with aiomqtt.Client(BROKER[0], BROKER[1], identifier=f"sub-{job_id}") as sub:
        await sub.subscribe(f"t/{job_id}", qos=1)
        with capture_logs() as logs:
            async with aclosing(MqttNotifier(target, broker)) as notifier:
                await notifier.deliver(message(job_id))
                # Another client taking over the notifier's id makes the broker drop its connection.
                async with aiomqtt.Client(BROKER[0], BROKER[1], identifier="studiohook-notify-bus"):
                    pass
                await notifier.deliver(message(job_id))
        with anyio.fail_after(5):
            got = [await anext(aiter(sub.messages)) for _ in range(2)]
    assert [m.topic.value for m in got] == [f"t/{job_id}", f"t/{job_id}"]
    assert [e["event"] for e in logs].count("mqtt_notify_connected") == 2


@pytest.mark.integration
@pytest.mark.anyio
async def test_instances_publish_on_connections_of_their_own(broker, tmp_path):
    job_id = f"job_instances_{tmp_path.name}"
    target = NotifyConfig(name="bus", kind="mqtt", topic="t/{job_id}")
    async with aiomqtt.Client(BROKER[0], BROKER[1], identifier=f"sub-{job_id}") as sub:
        await sub.subscribe(f"t/{job_id}", qos=1)
        with capture_logs() as logs:
            async with (
                aclosing(MqttNotifier(target, broker, instance="web-1")) as first,
                aclosing(MqttNotifier(target, broker, instance="web-2")) as second,
            ):
                for notifier in (first, second, first, second):
                    await notifier.deliver(message(job_id))
        with anyio.fail_after(5):
            got = [await anext(aiter(sub.messages)) for _ in range(4)]
    assert len(got) == 4
    connected = [e["client_id"] for e in logs if e["event"] == "mqtt_notify_connected"]
    assert connected == ["studiohook-notify-bus-web-1", "studiohook-notify-bus-web-2"]


@pytest.mark.integration
@pytest.mark.anyio
async def test_unreachable_broker_is_a_retryable_delivery_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = MqttConfig(url=f"mqtt://127.0.0.1:{port}", host="127.0.0.1", port=port)
    async with aclosing(MqttNotifier(NotifyConfig(name="bus", kind="mqtt"), dead)) as notifier:
        with pytest.raises(DeliveryError) as failed:
            await notifier.deliver(message("job_x"))
    assert not failed.value.permanent
