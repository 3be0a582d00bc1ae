"""ReadAhead over real socket pairs: paho's small reads served from one large read."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from service.ingress.mqtt_socket import CHUNK, ReadAhead


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
