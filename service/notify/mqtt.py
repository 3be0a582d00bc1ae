"""MQTT target: publish each event with QoS 1 and count it delivered only on PUBACK.

The notifier keeps its own connection under its own client id (`<client_id>-notify-<target>`,
then `-<instance>`: `[service] instance`, else the host name), so a broker that kicks duplicate ids
never disconnects the ingress subscriber, nor one instance's notifier another's. Messages are never
retained: a consumer that subscribes later must not receive an old "video ready" as new. A
broken connection is dropped and rebuilt on the next attempt; the message is published once
more at once on a fresh connection, then left to the sender's retry schedule.
"""

from __future__ import annotations

import re
import ssl
import string
from typing import TYPE_CHECKING

import aiomqtt
import anyio
import orjson

from service.log import get_logger
from service.mqtt_futures import settle_outcomes
from service.notify.payload import EVENT_TYPES
from service.notify.sender import DeliveryError

if TYPE_CHECKING:
    from service.config import MqttConfig, NotifyConfig
    from service.model import OutboxMessage

log = get_logger("notify.mqtt")

TOPIC_FIELDS = frozenset({"route", "job_id", "source", "event_type", "event"})
"""Placeholders a topic template may use; `topic_template_problem` checks against these."""

_WILDCARDS = ("+", "#")


def render_topic(template: str, *, route: str, job_id: str, source: str, event_type: str) -> str:
    """Fill a topic template: `{event_type}` is `video_ready`, `{event}` is `ready`.

    Raises ValueError for unknown placeholders or a topic no broker would accept.
    """
    values = {
        "route": route,
        "job_id": job_id,
        "source": source,
        "event_type": event_type.replace(".", "_"),
        "event": event_type.rpartition(".")[2],
    }
    try:
        topic = template.format_map(values)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"bad topic template {template!r}: {exc!r}") from exc
    if not topic or any(w in topic for w in _WILDCARDS):
        raise ValueError(f"topic {topic!r} is empty or contains a wildcard")
    return topic


def topic_template_problem(template: str) -> str | None:
    """Why a configured topic template would fail every publish, or None when it is fine.

    Pure, so `studiohook check` can refuse a bad template before the first video is ready
    instead of the sender retrying a message that can never be published.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"bad topic template {template!r}: {exc}"
    for field in fields:
        if re.split(r"[.\[]", field, maxsplit=1)[0] not in TOPIC_FIELDS:
            allowed = ", ".join(f"{{{f}}}" for f in sorted(TOPIC_FIELDS))
            return f"unknown placeholder {{{field}}} in topic {template!r}; use {allowed}"
    for event_type in sorted(EVENT_TYPES):
        try:
            render_topic(
                template, route="route", job_id="job_0", source="source", event_type=event_type
            )
        except ValueError as exc:
            return str(exc)
    return None


def topic_for(template: str, message: OutboxMessage) -> str:
    """Fill the template from an outbox row (route and source come from its payload)."""
    try:
        payload = orjson.loads(message.payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"outbox payload is not JSON: {exc}") from exc
    return render_topic(
        template,
        route=str(payload.get("route", "")),
        job_id=message.job_id,
        source=str(payload.get("source", "")),
        event_type=message.event_type,
    )


class MqttNotifier:
    """One MQTT target; several targets may share one notifier's connection settings."""

    def __init__(
        self,
        target: NotifyConfig,
        broker: MqttConfig,
        *,
        publish_timeout_s: float = 10.0,
        instance: str | None = None,
    ) -> None:
        self._name = target.name
        self._template = target.topic
        self._broker = broker
        # Instances sharing a store each publish on a connection of their own: with one id
        # the broker would drop whichever connected first, back and forth.
        suffix = f"-{instance}" if instance else ""
        self._client_id = f"{broker.client_id}-notify-{target.name}{suffix}"
        self._timeout_s = publish_timeout_s
        self._client: aiomqtt.Client | None = None
        self._connect_lock = anyio.Lock()

    async def aclose(self) -> None:
        """Disconnect cleanly (the composition root calls this at shutdown)."""
        if self._client is not None:
            await self._drop(self._client)

    async def deliver(self, message: OutboxMessage) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        try:
            topic = topic_for(self._template, message)
        except ValueError as exc:
            raise DeliveryError(str(exc), permanent=True) from exc
        last_error: aiomqtt.MqttError | None = None
        for _ in range(2):
            client = await self._connected()
            try:
                await client.publish(
                    topic, message.payload, qos=1, retain=False, timeout=self._timeout_s
                )
            except aiomqtt.MqttError as exc:
                last_error = exc
                log.warning("mqtt_publish_failed", target=self._name, error=str(exc))
                await self._drop(client)
            else:
                return
        raise DeliveryError(f"publish failed: {last_error}") from last_error

    async def _connected(self) -> aiomqtt.Client:
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            client = aiomqtt.Client(
                self._broker.host,
                self._broker.port,
                username=self._broker.username,
                password=self._broker.password,
                identifier=self._client_id,
                clean_session=True,
                timeout=self._timeout_s,
                tls_context=ssl.create_default_context() if self._broker.tls else None,
            )
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                settle_outcomes(client)
                raise DeliveryError(f"cannot connect to the broker: {exc}") from exc
            except BaseException:
                settle_outcomes(client)
                raise
            log.info("mqtt_notify_connected", target=self._name, client_id=self._client_id)
            self._client = client
            return client

    async def _drop(self, client: aiomqtt.Client) -> None:
        if self._client is client:
            self._client = None
        with anyio.move_on_after(self._timeout_s, shield=True):
            try:
                await client.__aexit__(None, None, None)
            except aiomqtt.MqttError as exc:
                log.info("mqtt_notify_disconnect_failed", target=self._name, error=str(exc))
        settle_outcomes(client)
