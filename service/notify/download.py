"""Optional local copy of a finished video, for targets that want a file instead of a URL.

The download URL comes from a third party, so it is only followed to hosts we trust (the API's
own hosts and `aistudios.download_hosts`), at every redirect hop. The file appears atomically:
bytes stream into a temp file in the same directory, are fsynced, then renamed, so a reader
never sees half a video and an aborted fetch leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio
import anyio.to_thread

from service.log import get_logger

if TYPE_CHECKING:
    from collections.abc import Collection

    from service.config import AIStudiosConfig

log = get_logger("notify.download")

DEFAULT_MAX_VIDEO_BYTES = 2 * 1024**3
MAX_REDIRECTS = 5
CHUNK_BYTES = 1024 * 1024
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)
_SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class DownloadError(Exception):
    """A video could not be fetched; `permanent` means trying again will not help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def allowed_download_hosts(aistudios: AIStudiosConfig) -> frozenset[str]:
    """Trust the API's own hosts plus the configured download hosts, nothing else."""
    hosts = {urlsplit(aistudios.base_url).hostname, urlsplit(aistudios.legacy_base_url).hostname}
    hosts.update(aistudios.download_hosts)
    return frozenset(h.lower() for h in hosts if h)


def host_allowed(url: str, allowed_hosts: Collection[str]) -> bool:
    """Check an http(s) URL's host against exact names and `*.example.com` wildcards."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in {"http", "https"} or not host:
        return False
    for entry in (a.lower() for a in allowed_hosts):
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


async def fetch_video(
    session: aiohttp.ClientSession,
    url: str,
    dest_dir: Path,
    job_id: str,
    *,
    allowed_hosts: Collection[str],
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
) -> tuple[Path, str]:
    """Fetch `url` into `dest_dir/<job_id>.mp4`; return the path and the hex sha256."""
    if not _SAFE_JOB_ID.fullmatch(job_id):
        raise DownloadError(f"job id {job_id!r} is not a safe file name", permanent=True)
    final = dest_dir / f"{job_id}.mp4"
    fd, temp = await anyio.to_thread.run_sync(_open_temp, dest_dir, job_id)
    try:
        async with await anyio.open_file(fd, "wb") as out:
            digest = await _stream(session, url, out, allowed_hosts, max_bytes)
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
        await anyio.to_thread.run_sync(_publish, temp, final)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_discard, temp)
        raise
    log.info("video_downloaded", job_id=job_id, path=str(final), sha256=digest)
    return final, digest


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    out: anyio.AsyncFile[bytes],
    allowed_hosts: Collection[str],
    max_bytes: int,
) -> str:
    """Follow trusted redirects, then copy the body while hashing and counting it."""
    for _ in range(MAX_REDIRECTS + 1):
        if not host_allowed(url, allowed_hosts):
            host = urlsplit(url).hostname
            raise DownloadError(
                f"refusing to download from {host!r}: not the API host or a configured "
                "aistudios.download_hosts entry",
                permanent=True,
            )
        try:
            async with session.get(url, allow_redirects=False, timeout=DOWNLOAD_TIMEOUT) as resp:
                if resp.status in _REDIRECTS and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                _check_response(resp, max_bytes)
                return await _copy(resp, out, max_bytes)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"download failed: {exc!r}", permanent=False) from exc
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects", permanent=True)


def _check_response(resp: aiohttp.ClientResponse, max_bytes: int) -> None:
    if resp.status != HTTPStatus.OK:
        retryable = (
            resp.status == HTTPStatus.TOO_MANY_REQUESTS
            or resp.status >= HTTPStatus.INTERNAL_SERVER_ERROR
        )
        raise DownloadError(f"download answered HTTP {resp.status}", permanent=not retryable)
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise DownloadError(
            f"video is {resp.content_length} bytes, over the {max_bytes} byte cap", permanent=True
        )


async def _copy(resp: aiohttp.ClientResponse, out: anyio.AsyncFile[bytes], max_bytes: int) -> str:
    digest = hashlib.sha256()
    size = 0
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise DownloadError(f"video exceeds the {max_bytes} byte cap", permanent=True)
        digest.update(chunk)
        await out.write(chunk)
    return digest.hexdigest()


def _open_temp(dest_dir: Path, job_id: str) -> tuple[int, Path]:
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest_dir, prefix=f".{job_id}.", suffix=".part")
    return fd, Path(name)


def _discard(temp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


def _publish(temp: Path, final: Path) -> None:
    """Rename into place and fsync the directory, so the name survives a power cut."""
    temp.replace(final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
