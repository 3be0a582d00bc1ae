"""MQTT ingress: QoS 1 subscriptions whose PUBACK goes out only after the intake committed.

aiomqtt acknowledges a QoS 1 message as soon as paho hands it over, so a crash between that
PUBACK and the inbox commit would lose a paid event. The wrapped paho client is therefore put
in manual-ack mode and each message is acknowledged after `Intake.accept`/`dead_letter`
returned, in arrival order, on the connection it arrived on. A persistent session (fixed client
id, no clean start, a session expiry) makes the broker keep queued and un-acked messages while
studiohook is down or reconnecting; the Receive Maximum bounds how many it hands over before
we acknowledge, which is the back-pressure: nothing is ever dropped on our side.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiomqtt
import anyio
import anyio.abc
import orjson
from paho.mqtt.client import MQTT_ERR_SUCCESS, topic_matches_sub
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from service.backoff import backoff_delay
from service.ingress.base import started_once
from service.ingress.mqtt_socket import quick_publishes, read_ahead, register_writes_in_step
from service.log import get_logger
from service.model import RawEvent
from service.mqtt_futures import settle_outcomes
from service.store.base import StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence

    from service.config import MqttConfig, SourceConfig
    from service.ingress.base import Intake

log = get_logger("ingress.mqtt")
_JITTER = random.SystemRandom()

_QOS = 1
_KEEPALIVE_S = 30
_DISCONNECT_GRACE_S = 2.0
_SHARED_PREFIX = "$share/"
_FIRST_FAILURE_CODE = 0x80
_TOPIC_CACHE_SIZE = 4096

T = TypeVar("T")


class UnreadablePayloadError(ValueError):
    """The payload cannot become an event (not UTF-8, not JSON): dead-letter it, then ack."""


class SubscriptionRefusedError(Exception):
    """The broker refused a subscription (ACL, bad filter): retried like a lost connection."""


def parse_payload(body: bytes) -> Any:  # noqa: ANN401 - any JSON value is a valid payload
    """Decode a message body; the reason of a failure is what the dead letter keeps."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadablePayloadError(f"payload is not UTF-8 (invalid byte at {exc.start})") from exc
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UnreadablePayloadError(f"payload is not JSON: {exc}") from exc


def user_properties(properties: Properties | None) -> dict[str, str]:
    """MQTT v5 user properties as headers with lower-case names (the last of a repeated name)."""
    pairs: list[tuple[str, str]] = getattr(properties, "UserProperty", None) or []
    return {name.lower(): value for name, value in pairs}


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a delivery on `topic` belongs to a source subscribed with `topic_filter`.

    A shared subscription (`$share/group/filter`) matches on its filter part.
    """
    if topic_filter.startswith(_SHARED_PREFIX):
        topic_filter = topic_filter[len(_SHARED_PREFIX) :].partition("/")[2]
    return bool(topic_matches_sub(topic_filter, topic))


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One delivery's place in the arrival order."""

    item: T
    committed: bool = False


class AckSequencer(Generic[T]):
    """Releases acknowledgements in arrival order while commits finish in any order.

    MQTT requires PUBACKs in the order the PUBLISHes arrived (MQTT 5, 4.6), and acking a later
    message before an earlier one is committed would let the broker forget the later one while
    the earlier may still be lost.
    """

    def __init__(self) -> None:
        self._waiting: deque[Ticket[T]] = deque()

    def arrived(self, item: T) -> Ticket[T]:
        """Take a place in line for a delivery that just arrived."""
        ticket = Ticket(item)
        self._waiting.append(ticket)
        return ticket

    def committed(self, ticket: Ticket[T]) -> list[T]:
        """Mark a delivery committed; return every delivery now ackable, oldest first."""
        ticket.committed = True
        ready: list[T] = []
        while self._waiting and self._waiting[0].committed:
            ready.append(self._waiting.popleft().item)
        return ready

    def __len__(self) -> int:
        return len(self._waiting)


def group_size(*, waiting: int, in_flight: int, limit: int) -> int:
    """How many messages the next commit group takes (the reader waited for room first).

    The one in hand, then as many of those already waiting as the in-flight limit allows.
    """
    return 1 + max(0, min(waiting, limit - in_flight - 1))


class Room:
    """Counts messages handed to the intake and not yet committed; the reader waits for room.

    The broker's Receive Maximum bounds what is un-acked; this bounds the intake's own work
    (a held commit does not stop the others behind it from going ahead, up to the limit).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.used = 0
        self._freed = anyio.Event()

    async def wait(self) -> None:
        """Return once at least one more message may go in."""
        while self.used >= self.limit:
            if self._freed.is_set():
                self._freed = anyio.Event()
            await self._freed.wait()

    def enter(self, count: int) -> None:
        """`count` messages went to the intake."""
        self.used += count

    def leave(self, count: int) -> None:
        """`count` messages came back (committed or failed)."""
        self.used -= count
        if not self._freed.is_set():
            self._freed.set()


def arrived_queue(client: aiomqtt.Client) -> asyncio.Queue[aiomqtt.Message]:
    """The messages aiomqtt has received and not yet handed out, taken without a wake-up each.

    aiomqtt 2.x only hands them out one by one, each through a task of its own; a group takes
    the ones already there straight from its queue (test_mqtt_ingress checks it exists).
    """
    queue = client._queue  # noqa: SLF001
    if not isinstance(queue, asyncio.Queue):
        raise TypeError("aiomqtt no longer keeps received messages in an asyncio.Queue")
    return queue


async def _all_or_raise(deliveries: list[Coroutine[Any, Any, None]]) -> None:
    """Run a group's deliveries together; once all ended, raise the first failure if any.

    No delivery is left running when this returns or raises; one that failed was not
    acknowledged, and neither is anything that arrived after it (the connection ends and
    the broker hands them over again).
    """
    outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


class MqttIngress:
    """Subscribes every mqtt source's topic and commits each message before acknowledging it.

    `connected` is true while subscribed, for /readyz.
    """

    def __init__(
        self,
        *,
        config: MqttConfig,
        sources: Sequence[SourceConfig],
        intake: Intake,
        max_in_flight: int | None = None,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._config = config
        self._sources = tuple(s for s in sources if s.kind == "mqtt" and s.topic)
        self._intake = intake
        # The broker hands over at most Receive Maximum un-acked messages: by default the
        # intake may work on all of them at once.
        self._max_in_flight = max_in_flight or config.receive_maximum
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._generation = 0
        self._failures = 0
        self._by_topic: dict[str, list[SourceConfig]] = {}
        self.connected = False

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until cancelled, reconnecting with backoff; started after the first SUBACK."""
        subscribed = started_once(task_status)

        if not self._sources:
            log.warning("mqtt ingress has no mqtt source with a topic; nothing to subscribe")
            subscribed()
            await anyio.sleep_forever()
        while True:
            connected_at = anyio.current_time()
            reason = await self._connect_once(subscribed)
            if anyio.current_time() - connected_at >= self._backoff_max_s:
                self._failures = 0
            self._failures += 1
            delay_s = backoff_delay(
                self._failures, base_s=self._backoff_min_s, cap_s=self._backoff_max_s, rng=_JITTER
            )
            log.warning(
                "mqtt reconnecting",
                attempt=self._failures,
                delay_s=round(delay_s, 3),
                reason=reason,
            )
            await anyio.sleep(delay_s)

    async def _connect_once(self, subscribed: Callable[[], None]) -> str:
        """Run one connection to its end and say why it ended (cancellation propagates)."""
        reason = "connection closed"
        try:
            await self._connection(subscribed)
        except* (aiomqtt.MqttError, SubscriptionRefusedError) as group:
            reason = f"mqtt: {_first(group)}"
        except* StoreUnavailableError as group:
            reason = f"store unavailable, un-acked messages will be redelivered: {_first(group)}"
        return reason

    async def _connection(self, subscribed: Callable[[], None]) -> None:
        self._generation += 1
        generation = self._generation
        client = self._new_client()
        log.info(
            "mqtt connecting",
            host=self._config.host,
            port=self._config.port,
            client_id=self._config.client_id,
            generation=generation,
        )
        async with _connected(client):
            await self._subscribe(client)
            self.connected = True
            subscribed()
            try:
                await self._consume(client, generation)
            finally:
                self.connected = False

    def _new_client(self) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._config.session_expiry_seconds
        properties.ReceiveMaximum = self._config.receive_maximum
        client = aiomqtt.Client(
            self._config.host,
            self._config.port,
            username=self._config.username,
            password=self._config.password,
            identifier=self._config.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=_KEEPALIVE_S,
            tls_context=ssl.create_default_context() if self._config.tls else None,
        )
        # aiomqtt 2.x has no public manual ack; test_mqtt_ingress checks these internals exist.
        client._client.manual_ack_set(on=True)  # noqa: SLF001
        return client

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        topics = list(dict.fromkeys(s.topic for s in self._sources if s.topic))
        # Retained messages only on a new subscription: a resubscribe of a persistent session
        # must not replay them on every reconnect.
        options = SubscribeOptions(qos=_QOS, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        codes = await client.subscribe([(topic, options) for topic in topics])
        granted: list[ReasonCode | int] = list(codes)
        for topic, code in zip(topics, granted, strict=True):
            value = code.value if isinstance(code, ReasonCode) else code
            if value >= _FIRST_FAILURE_CODE:
                raise SubscriptionRefusedError(f"subscription to {topic!r} refused: {code}")
            if value < _QOS:
                log.warning("mqtt broker granted qos 0; deliveries are not guaranteed", topic=topic)
        log.info("mqtt subscribed", topics=topics)

    async def _consume(self, client: aiomqtt.Client, generation: int) -> None:
        """Commit what has arrived in groups; acknowledge each message in arrival order.

        Every message already received when the reader looks joins one group: one task and
        one wake-up per group instead of per message, and the store commits what is pending
        in one transaction. Each message is acknowledged as soon as it and every message that
        arrived before it committed (AckSequencer), from the step that finished its commit.
        """
        sequencer: AckSequencer[aiomqtt.Message] = AckSequencer()
        room = Room(self._max_in_flight)
        queued = arrived_queue(client)
        messages = client.messages
        async with anyio.create_task_group() as tg:
            while True:
                first = await anext(messages)
                await room.wait()
                size = group_size(waiting=queued.qsize(), in_flight=room.used, limit=room.limit)
                group = [first, *(queued.get_nowait() for _ in range(size - 1))]
                room.enter(size)
                tickets = [sequencer.arrived(message) for message in group]
                tg.start_soon(self._commit, client, generation, sequencer, room, tickets)

    async def _commit(
        self,
        client: aiomqtt.Client,
        generation: int,
        sequencer: AckSequencer[aiomqtt.Message],
        room: Room,
        tickets: list[Ticket[aiomqtt.Message]],
    ) -> None:
        """Deliver a group's messages together; each commit acknowledges what it can."""

        async def deliver(ticket: Ticket[aiomqtt.Message]) -> None:
            try:
                await self._deliver(ticket.item)
            finally:
                room.leave(1)
            self._failures = 0
            # Right here, in the step that finished the commit: a PUBACK must not wait for
            # another pass of the event loop.
            self._acknowledge(client, generation, sequencer.committed(ticket))

        await _all_or_raise([deliver(ticket) for ticket in tickets])

    def _acknowledge(
        self, client: aiomqtt.Client, generation: int, messages: list[aiomqtt.Message]
    ) -> None:
        if generation != self._generation:
            return  # the broker redelivers them on the connection that replaced this one
        for message in messages:
            if message.qos == 0:
                continue
            rc = client._client.ack(message.mid, message.qos)  # noqa: SLF001
            if rc != MQTT_ERR_SUCCESS:
                log.warning("mqtt ack not sent; broker will redeliver", mid=message.mid, rc=rc)

    def _sources_of(self, topic: str) -> list[SourceConfig]:
        """The sources whose filter matches `topic`; remembered, a topic's answer never changes."""
        found = self._by_topic.get(topic)
        if found is None:
            if len(self._by_topic) >= _TOPIC_CACHE_SIZE:
                self._by_topic.clear()  # many distinct topics (one per device): start over
            found = [s for s in self._sources if s.topic and matches(s.topic, topic)]
            self._by_topic[topic] = found
        return found

    async def _deliver(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        sources = self._sources_of(topic)
        if not sources:
            log.warning("mqtt message matches no source; acknowledged unstored", topic=topic)
            return
        body = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
        headers = user_properties(message.properties)
        try:
            payload = parse_payload(body)
        except UnreadablePayloadError as exc:
            for source in sources:
                await self._dead_letter(source, body, headers, str(exc), topic)
            return
        for source in sources:
            raw = RawEvent(source=source.name, payload=payload, headers=headers, topic=topic)
            acceptance = await self._intake.accept(source, raw, body)
            log.info(
                "mqtt message accepted",
                source=source.name,
                topic=topic,
                event_id=acceptance.event_id,
                duplicate=acceptance.duplicate,
                jobs=len(acceptance.job_ids),
                outcome=str(acceptance.status),
            )

    async def _dead_letter(
        self, source: SourceConfig, body: bytes, headers: Mapping[str, str], reason: str, topic: str
    ) -> None:
        acceptance = await self._intake.dead_letter(source, body, headers, reason, topic=topic)
        # The intake logged the warning with the reason; this line is the transport's view.
        log.info(
            "mqtt message dead-lettered",
            source=source.name,
            topic=topic,
            event_id=acceptance.event_id,
            reason=reason,
        )


@asynccontextmanager
async def _connected(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """Connect; on the way out send DISCONNECT even when cancelled, but never wait long.

    Un-acked messages stay with the broker's session either way; the shielded, bounded exit
    only keeps the socket from leaking and makes shutdown prompt.
    """
    try:
        await client.__aenter__()
    except BaseException:
        settle_outcomes(client)
        raise
    try:
        register_writes_in_step(client)
        read_ahead(client)
        quick_publishes(client)
        yield client
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_DISCONNECT_GRACE_S):
            await client.__aexit__(None, None, None)
        settle_outcomes(client)


def _first(group: BaseExceptionGroup[Any]) -> str:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return str(leaves[0]) if leaves else repr(group)
