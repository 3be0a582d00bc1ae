"""The shims under paho: ReadAhead over real socket pairs, quick PUBLISHes against paho."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import MQTTProtocolVersion

from service.ingress.mqtt_socket import CHUNK, ReadAhead, decode_quick_publish


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_small_reads_come_in_order_from_one_read_and_pending_counts_what_is_left(pair):
    ours, theirs = pair
    theirs.sendall(b"\x30\x05hello\x30\x03abc")
    reads = ReadAhead(ours)
    assert reads.recv(1) == b"\x30"
    assert reads.pending() == 11
    assert reads.recv(1) == b"\x05"
    assert reads.recv(5) == b"hello"
    assert reads.recv(1) == b"\x30"
    assert reads.recv(1) == b"\x03"
    assert reads.pending() == 3
    assert reads.recv(3) == b"abc"
    assert reads.pending() == 0
    with pytest.raises(BlockingIOError):
        reads.recv(1)


def test_a_read_longer_than_what_is_left_returns_the_rest_then_reads_the_socket(pair):
    ours, theirs = pair
    theirs.sendall(b"abcdef")
    reads = ReadAhead(ours)
    assert reads.recv(2) == b"ab"
    theirs.sendall(b"ghij")
    assert reads.recv(10) == b"cdef"  # a short read, as a socket's own would be
    assert reads.pending() == 0
    assert reads.recv(10) == b"ghij"


def test_nothing_is_kept_when_a_read_asks_for_at_least_what_came(pair):
    ours, theirs = pair
    theirs.sendall(b"xyz")
    reads = ReadAhead(ours)
    assert reads.recv(CHUNK * 2) == b"xyz"
    assert reads.pending() == 0


def test_more_than_a_chunk_is_read_in_chunks_without_losing_a_byte(pair):
    ours, theirs = pair
    data = bytes(range(256)) * ((CHUNK * 3) // 256)
    theirs.setblocking(True)
    reads = ReadAhead(ours)
    received = bytearray()
    sent = 0
    while len(received) < len(data):
        if sent < len(data):
            sent += theirs.send(data[sent : sent + 50_000])
        try:
            received += reads.recv(7)
        except BlockingIOError:
            continue
    assert bytes(received) == data


def test_the_end_of_the_stream_is_an_empty_read_after_what_was_read_ahead(pair):
    ours, theirs = pair
    theirs.sendall(b"last")
    theirs.shutdown(socket.SHUT_WR)
    reads = ReadAhead(ours)
    assert reads.recv(2) == b"la"
    assert reads.recv(2) == b"st"
    assert reads.recv(2) == b""


def test_everything_else_is_the_wrapped_socket(pair):
    ours, theirs = pair
    reads = ReadAhead(ours)
    assert reads.fileno() == ours.fileno()
    assert reads.send(b"out") == 3
    assert theirs.recv(3) == b"out"


class DecryptedAhead:
    """A TLS socket as far as ReadAhead can tell: `recv` plus `pending` decrypted bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, bufsize: int, /) -> bytes:
        piece, self.data = self.data[:5], self.data[5:]  # TLS hands out a record at a time
        return piece[:bufsize]

    def pending(self) -> int:
        return len(self.data)


def test_pending_adds_what_a_tls_socket_holds_decrypted():
    reads = ReadAhead(DecryptedAhead(b"0123456789"))
    assert reads.recv(2) == b"01"
    assert reads.pending() == 3 + 5
    assert reads.recv(10) == b"234"
    assert reads.recv(10) == b"56789"
    assert reads.pending() == 0


# --- decode_quick_publish against paho's own decoder --------------------------------------


def publish_packet(
    *, topic: bytes, mid: int, payload: bytes, properties: bytes = b"\x00", qos: int = 1
) -> tuple[int, bytes]:
    """A PUBLISH's first header byte and what follows its remaining length (MQTT 5)."""
    header = 0x30 | (qos << 1)
    packet = len(topic).to_bytes(2, "big") + topic
    if qos:
        packet += mid.to_bytes(2, "big")
    return header, packet + properties + payload


@pytest.mark.parametrize(
    ("topic", "mid", "payload", "flags"),
    [
        (b"studiohook/in/products/bench", 7, b'{"id": "x"}', 0),
        (b"a", 65535, b"", 0x08),  # dup, empty payload
        (b"t/\xc3\xa9/+", 1, bytes(range(256)) * 8, 0x01),  # retain, any bytes
        (b"x" * 300, 256, b"\x00", 0x09),
    ],
)
def test_a_plain_qos1_publish_decodes_as_paho_decodes_it(topic, mid, payload, flags):
    header, packet = publish_packet(topic=topic, mid=mid, payload=payload)
    header |= flags
    quick = decode_quick_publish(header, bytearray(packet))
    paho_says = decode_publish(header, bytearray(packet), MQTTProtocolVersion.MQTTv5)
    assert quick is not None
    assert (quick.topic, quick.mid, quick.payload, quick.dup, quick.retain) == (
        paho_says.topic,
        paho_says.mid,
        paho_says.payload,
        paho_says.dup,
        paho_says.retain,
    )
    assert isinstance(quick.payload, bytes)


def test_properties_another_qos_or_an_odd_packet_are_left_to_paho():
    user_property = b"\x07\x26\x00\x01k\x00\x01v"  # length 7: one user property k=v
    header, packet = publish_packet(topic=b"t", mid=1, payload=b"{}", properties=user_property)
    assert decode_quick_publish(header, packet) is None
    paho_says = decode_publish(header, bytearray(packet), MQTTProtocolVersion.MQTTv5)
    assert paho_says.properties.UserProperty == [("k", "v")]  # the packet is well formed
    header, packet = publish_packet(topic=b"t", mid=1, payload=b"{}", qos=0)
    assert decode_quick_publish(header, packet) is None
    header, packet = publish_packet(topic=b"t", mid=1, payload=b"{}", qos=2)
    assert decode_quick_publish(header, packet) is None
    header, packet = publish_packet(topic=b"", mid=1, payload=b"{}")
    assert decode_quick_publish(header, packet) is None  # empty topic: an alias, paho's call
    assert decode_quick_publish(0x32, b"\x00") is None
    assert decode_quick_publish(0x32, b"\x00\x05abc") is None  # shorter than its topic length
    assert decode_quick_publish(0x32, b"\x00\x01t\x00\x01") is None  # no property length
