"""Does a finished video's URL still download? Asked before the render cache reuses it.

The vendor documents no lifetime for download URLs, so a cached video is only reused after a
`HEAD` answers 2xx; a server that refuses HEAD (405/501) is asked for one byte with a range
GET instead. Any other answer, or no answer, means "export again".
"""

from __future__ import annotations

from http import HTTPStatus

import aiohttp

from service.log import get_logger

log = get_logger("notify.probe")

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
_NO_HEAD = frozenset({HTTPStatus.METHOD_NOT_ALLOWED, HTTPStatus.NOT_IMPLEMENTED})


class HttpProbe:
    """The `UrlProbe` port over one aiohttp session, opened on first use and closed by `aclose`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def downloads(self, url: str) -> bool:
        """True when the URL answers HEAD (or a one-byte range GET) with success."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=PROBE_TIMEOUT)
        try:
            async with self._session.head(url, allow_redirects=True) as response:
                if response.status < HTTPStatus.MULTIPLE_CHOICES:
                    return True
                if response.status not in _NO_HEAD:
                    log.info("cache.url_gone", status=response.status)
                    return False
            headers = {"Range": "bytes=0-0"}
            async with self._session.get(url, headers=headers) as response:
                return response.status in {HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT}
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("cache.url_unreachable", error=str(exc))
            return False

    async def aclose(self) -> None:
        """Close the session, if one was opened."""
        if self._session is not None:
            await self._session.close()
