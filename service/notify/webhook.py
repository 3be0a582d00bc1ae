"""Webhook target: POST each event, signed the Standard Webhooks way.

The `webhook-id` is derived from (job, round, event type, target), so every delivery retry and
every re-send after a crash carries the same id and a receiver can dedupe on it, while an
operator's retry of the job (a new round: a new export name) announces under a new id.

Status handling: 2xx delivered; 410 Gone disables this target for the message (dead at once);
429 and 5xx retry on the sender's schedule, honouring Retry-After; connection errors and
timeouts retry; any other status (3xx, 4xx) is retried `OTHER_STATUS_ATTEMPTS` times in case
it was a deploy hiccup on the receiver's side, then the message is dead.
"""

from __future__ import annotations

import hashlib
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import aiohttp

from service.ingress.signatures import sign_standard
from service.log import get_logger
from service.notify.sender import DeliveryError
from service.retry_after import parse_retry_after

if TYPE_CHECKING:
    from service.config import NotifyConfig
    from service.model import OutboxMessage
    from service.notify.sender import Clock

log = get_logger("notify.webhook")

OTHER_STATUS_ATTEMPTS = 3
_DRAIN_BYTES = 64 * 1024
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30.0, connect=10.0)
_RETRY_STATUSES = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})


def webhook_id(job_id: str, export_name: str, event_type: str, target: str) -> str:
    """Derive the message id a receiver dedupes on: stable within one round of the job."""
    key = f"{job_id}\x00{export_name}\x00{event_type}\x00{target}"
    return f"msg_{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _error_for_status(status: int, retry_after_s: float | None) -> DeliveryError:
    message = f"HTTP {status}"
    if status == HTTPStatus.GONE:
        return DeliveryError(f"{message}: receiver is gone", permanent=True)
    if status in _RETRY_STATUSES or status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return DeliveryError(message, retry_after_s=retry_after_s)
    return DeliveryError(message, attempt_limit=OTHER_STATUS_ATTEMPTS)


class WebhookNotifier:
    """One webhook target with its own HTTP session; use `async with` to close it."""

    def __init__(
        self,
        target: NotifyConfig,
        *,
        clock: Clock = time.time,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
    ) -> None:
        if not target.url:
            raise ValueError(f"notify target {target.name!r} has no url")
        self._name = target.name
        self._url = target.url
        self._secret = target.secret
        self._clock = clock
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        """Close the HTTP session (the composition root calls this at shutdown)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers_for(self, message: OutboxMessage, timestamp: int) -> dict[str, str]:
        """Build the Standard Webhooks headers for one attempt at `timestamp` (epoch seconds)."""
        msg_id = webhook_id(message.job_id, message.export_name, message.event_type, message.target)
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._secret:
            headers["webhook-signature"] = sign_standard(
                self._secret, msg_id, timestamp, message.payload
            )
        return headers

    async def deliver(self, message: OutboxMessage) -> None:
        """POST the payload; return on 2xx, raise DeliveryError otherwise."""
        now = self._clock()
        headers = self.headers_for(message, int(now))
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                self._url, data=message.payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after_s = parse_retry_after(response.headers.get("Retry-After"), now)
                await response.content.read(_DRAIN_BYTES)  # lets a short answer keep the connection
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if HTTPStatus.OK <= status < HTTPStatus.MULTIPLE_CHOICES:
            return
        error = _error_for_status(status, retry_after_s)
        if error.permanent:
            log.warning(
                "webhook_target_gone", target=self._name, job_id=message.job_id, status=status
            )
        raise error
