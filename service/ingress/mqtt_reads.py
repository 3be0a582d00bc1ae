"""Read-ahead under paho's socket reads: many MQTT packets per wake-up instead of one.

paho reads each packet with three `recv` calls (type byte, length, rest) and its `loop_read`
handles one packet per readable event, so a burst costs three system calls and one pass of
the event loop per message. `ReadAhead` takes whatever the socket holds in one `recv` and
serves paho's small reads from it; its `pending()` makes aiomqtt's reader call `loop_read`
again while read-ahead bytes remain (the same hook it uses for TLS sockets), so every packet
already received is handled in the same wake-up. Nothing else of the socket changes: sends,
`fileno`, `close` and the rest go straight to the wrapped socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiomqtt

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
