"""Reading a request body with a size limit and a deadline, neither of which aiohttp enforces.

aiohttp's server has no body timeout, and its size limit only guards `request.read()`. The
limit here counts bytes after Content-Encoding is undone, so a gzip bomb stops at the limit:
aiohttp inflates a compressed body in bounded steps as it is read, and reading stops as soon
as the limit is passed.
"""

from __future__ import annotations

import anyio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

READ_CHUNK_BYTES = 64 * 1024


class BodyTooLargeError(Exception):
    """The body (decompressed) is larger than the limit: answer 413."""


class BodyTimeoutError(Exception):
    """The body did not arrive in time: answer 408."""


class BodyUnreadableError(Exception):
    """The body could not be decoded (broken gzip, bad chunked framing): answer 400."""


async def read_body(request: web.BaseRequest, *, max_bytes: int, timeout_s: float) -> bytes:
    """Read the whole body, or raise one of the Body*Error exceptions above.

    A declared Content-Length over the limit is refused before any byte is read.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise BodyTooLargeError(f"body of {declared} bytes is over the {max_bytes} byte limit")
    if request.content.is_eof():
        # The whole body arrived with the headers (the common case for a webhook): it is
        # already buffered, so there is nothing to wait for and no deadline to arm.
        return _buffered(request, max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout_s):
            while chunk := await request.content.read(min(READ_CHUNK_BYTES, max_bytes - size + 1)):
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLargeError(f"body is over the {max_bytes} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeoutError(f"body not received within {timeout_s:g} s") from None
    except (web.RequestPayloadError, HttpProcessingError):
        raise BodyUnreadableError(
            "body could not be decoded (broken Content-Encoding or framing)"
        ) from None
    return b"".join(chunks)


def _buffered(request: web.BaseRequest, max_bytes: int) -> bytes:
    try:
        body = request.content.read_nowait()
    except (web.RequestPayloadError, HttpProcessingError):
        raise BodyUnreadableError(
            "body could not be decoded (broken Content-Encoding or framing)"
        ) from None
    if len(body) > max_bytes:
        raise BodyTooLargeError(f"body is over the {max_bytes} byte limit")
    return body
