"""`download = true`: keep a local copy of the video and announce its path and sha256.

The copy is made on the way out, just before the first `video.ready` that wants it is
delivered: the render is already committed as ready, a failed download is retried with the
delivery (the URL stays in the outbox), and a copy made once is reused by every target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio
import orjson

from service.log import get_logger
from service.model import JobUpdate, OutboxMessage
from service.notify.download import DownloadError, fetch_video
from service.notify.payload import VIDEO_READY
from service.notify.sender import DeliveryError, Notifier
from service.store.base import Store

log = get_logger("notify.local_copy")


class LocalCopy:
    """Fetches each job's video once (per-job lock), records it on the job, returns the fields."""

    def __init__(
        self,
        store: Store,
        session: aiohttp.ClientSession,
        videos_dir: Path,
        allowed_hosts: frozenset[str],
    ) -> None:
        self._store = store
        self._session = session
        self._videos_dir = videos_dir
        self._allowed_hosts = allowed_hosts
        self._locks: dict[str, anyio.Lock] = {}

    async def ensure(self, job_id: str) -> dict[str, str]:
        """The `video_path` / `video_sha256` fields, downloading the video the first time."""
        lock = self._locks.setdefault(job_id, anyio.Lock())
        async with lock:
            job = await self._store.get_job(job_id)
            if job is None or not job.download_url:
                raise DeliveryError(f"job {job_id} has no download URL", permanent=True)
            if job.video_path is None or job.video_sha256 is None:
                await anyio.Path(self._videos_dir).mkdir(parents=True, exist_ok=True)
                try:
                    path, sha256 = await fetch_video(
                        self._session,
                        job.download_url,
                        self._videos_dir,
                        job_id,
                        allowed_hosts=self._allowed_hosts,
                    )
                except DownloadError as exc:
                    raise DeliveryError(str(exc), permanent=exc.permanent) from exc
                except aiohttp.ClientError as exc:
                    raise DeliveryError(f"download failed: {exc}") from exc
                job = await self._store.update_job(
                    job_id, JobUpdate(video_path=str(path), video_sha256=sha256)
                )
            self._locks.pop(job_id, None)
            return {"video_path": job.video_path or "", "video_sha256": job.video_sha256 or ""}


class WithLocalCopy:
    """A notifier whose `video.ready` messages carry the local copy of the video."""

    def __init__(
        self, inner: Notifier, copy: LocalCopy, wants_copy: Callable[[OutboxMessage], bool]
    ) -> None:
        self._inner = inner
        self._copy = copy
        self._wants_copy = wants_copy

    async def deliver(self, message: OutboxMessage) -> None:
        """Add the copy's fields to the stored payload, then deliver as the target would."""
        if message.event_type != VIDEO_READY or not self._wants_copy(message):
            await self._inner.deliver(message)
            return
        fields = await self._copy.ensure(message.job_id)
        payload = {**orjson.loads(message.payload), **fields}
        await self._inner.deliver(dataclasses.replace(message, payload=orjson.dumps(payload)))
