"""Three confined shims under paho for the MQTT ingress's throughput (profile in README).

Many packets read per wake-up, writes registered in step, and the usual QoS 1 PUBLISH decoded
without building an empty property set.

paho reads each packet with three `recv` calls (type byte, length, rest) and its `loop_read`
handles one packet per readable event, so a burst costs three system calls and one pass of
the event loop per message. `ReadAhead` takes whatever the socket holds in one `recv` and
serves paho's small reads from it; its `pending()` makes aiomqtt's reader call `loop_read`
again while read-ahead bytes remain (the same hook it uses for TLS sockets), so every packet
already received is handled in the same wake-up. Nothing else of the socket changes: sends,
`fileno`, `close` and the rest go straight to the wrapped socket.

Reading a burst that fast exposed a race in how aiomqtt waits to write: it registers the
writer through `call_soon_threadsafe`, one pass of the loop later, so a PUBACK queued in the
same pass in which the broker's close is read registers a writer for a socket already closed
(EBADF from the loop, and on a reused descriptor, a stale writer on the next connection's
socket). `register_writes_in_step` registers it at once instead; paho unregisters it before it
closes the socket, so the two stay in order. It is installed once connected, when every call
of paho comes from the event loop's own thread.

paho builds a `Properties` object for every MQTT 5 PUBLISH, tables included, even when the
packet carries no property at all (a fifth of the event loop's time in a burst).
`decode_quick_publish` reads the common case, QoS 1 with an empty property section, and
`quick_publishes` hands it to paho's own message path with no properties (None, as paho does
for MQTT 3); anything else (another QoS, properties, an odd packet) goes to paho's decoder.
"""

from __future__ import annotations

import asyncio
import types
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessage, MQTTv5, time_func
from paho.mqtt.enums import MQTTErrorCode

if TYPE_CHECKING:
    import aiomqtt
    from paho.mqtt.client import Client as PahoClient

CHUNK = 65536
"""At most this much is read at once (about 150 QoS 1 messages of 400 bytes)."""


class _Readable(Protocol):
    def recv(self, bufsize: int, /) -> bytes: ...


class ReadAhead:
    """A socket whose `recv` is served from one larger read of the socket it wraps."""

    __slots__ = ("_buffer", "_offset", "_sock")

    def __init__(self, sock: _Readable) -> None:
        self._sock = sock
        self._buffer = b""
        self._offset = 0

    def recv(self, bufsize: int, /) -> bytes:
        """Up to `bufsize` bytes: what was read ahead first, then one read of up to CHUNK.

        Raises what the socket's own `recv` raises (BlockingIOError when nothing is there)
        only when nothing is left from before, so no byte is ever skipped or reordered.
        """
        if self._offset >= len(self._buffer):
            data = self._sock.recv(max(bufsize, CHUNK))
            if len(data) <= bufsize:
                return data
            self._buffer, self._offset = data, 0
        start = self._offset
        self._offset = min(start + bufsize, len(self._buffer))
        return self._buffer[start : self._offset]

    def pending(self) -> int:
        """Bytes read ahead and not yet handed out, plus what a TLS socket holds decrypted."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) - self._offset + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever the socket has
        return getattr(self._sock, name)


def read_ahead(client: aiomqtt.Client) -> None:
    """Put ReadAhead under a connected client's paho socket (test_mqtt_ingress checks it)."""
    paho = client._client  # noqa: SLF001
    sock = paho._sock  # noqa: SLF001
    if sock is None or isinstance(sock, ReadAhead):
        return
    paho._sock = ReadAhead(sock)  # noqa: SLF001


def register_writes_in_step(client: aiomqtt.Client) -> None:
    """Register paho's pending writes with the event loop at once, not one pass later.

    Call it from the event loop once connected. A failing write ends the connection the way
    aiomqtt's own writer does: its iterator raises MqttError.
    """
    loop = asyncio.get_running_loop()
    disconnected: asyncio.Future[None] = client._disconnected  # noqa: SLF001

    def register(paho: PahoClient, _userdata: object, sock: Any) -> None:  # noqa: ANN401
        def write() -> None:
            try:
                paho.loop_write()
            except Exception as exc:  # noqa: BLE001 - a broken pipe ends the connection
                if not disconnected.done():
                    disconnected.set_exception(exc)

        loop.add_writer(sock.fileno(), write)

    client._client.on_socket_register_write = register  # noqa: SLF001


class QuickPublish(NamedTuple):
    """What a QoS 1 PUBLISH without properties carries."""

    topic: bytes
    mid: int
    payload: bytes
    dup: bool
    retain: bool


_QOS_BITS = 0x06
_QOS_1 = 0x02
_DUP_BIT = 0x08
_RETAIN_BIT = 0x01


def decode_quick_publish(header: int, packet: bytes | bytearray) -> QuickPublish | None:
    """Decode an MQTT 5 QoS 1 PUBLISH whose property section is empty; None for any other.

    `header` is the fixed header's first byte, `packet` what follows the remaining length:
    topic length, topic, packet id, property length (one zero byte here), payload. A packet
    this does not read (other QoS, properties, empty topic, too short) is left to paho.
    """
    if header & _QOS_BITS != _QOS_1 or len(packet) < 2:  # noqa: PLR2004 - the topic length
        return None
    topic_end = 2 + ((packet[0] << 8) | packet[1])
    if topic_end == 2 or len(packet) < topic_end + 3 or packet[topic_end + 2] != 0:  # noqa: PLR2004
        return None
    return QuickPublish(
        topic=bytes(packet[2:topic_end]),
        mid=(packet[topic_end] << 8) | packet[topic_end + 1],
        payload=bytes(packet[topic_end + 3 :]),
        dup=bool(header & _DUP_BIT),
        retain=bool(header & _RETAIN_BIT),
    )


def quick_publishes(client: aiomqtt.Client) -> None:
    """Decode this client's plain QoS 1 PUBLISHes with `decode_quick_publish`.

    Only with manual acks on MQTT 5 (what the ingress uses): paho then neither acks nor
    stores a QoS 1 message itself, so handing it to `on_message` (aiomqtt's queue) is all it
    would do after decoding. Neither aiomqtt nor the ingress adds per-filter callbacks, so
    paho's matching of the topic against them (a trie walk per message) is skipped.
    test_mqtt_ingress checks these paho internals still exist.
    """
    paho = client._client  # noqa: SLF001
    if not paho._manual_ack or paho._protocol != MQTTv5:  # noqa: SLF001
        return
    decode_fully = paho._handle_publish  # noqa: SLF001

    def handle_publish(self: PahoClient) -> MQTTErrorCode:
        incoming = self._in_packet
        quick = decode_quick_publish(incoming["command"], incoming["packet"])
        if quick is None:
            return decode_fully()
        message = MQTTMessage(mid=quick.mid, topic=quick.topic)
        message.dup = quick.dup
        message.qos = 1
        message.retain = quick.retain
        message.payload = quick.payload
        message.timestamp = time_func()
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)
        return MQTT_ERR_SUCCESS

    paho._handle_publish = types.MethodType(handle_publish, paho)  # type: ignore[method-assign]  # noqa: SLF001
