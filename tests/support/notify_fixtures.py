"""Fixtures for the notify tests: a Standard Webhooks receiver on loopback, and sample jobs."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web

from service.model import Job, JobState
from tests.support.loopback import serve_app

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"notify-test-secret-32-bytes-long").decode()


def ready_job(**changes: Any) -> Job:
    """A job that has just become ready, with fixed times so payloads are predictable."""
    job = Job(
        job_id="job_0123456789abcdef01234567",
        event_row=7,
        source="shopify",
        route="new-product",
        state=JobState.READY,
        export_name="sh-new-product-abc",
        created_at=1_700_000_000.0,
        updated_at=1_700_000_090.0,
        project_id="proj_42",
        progress=100.0,
        download_url="https://cdn.example.com/videos/proj_42.mp4",
        attempts=1,
        submitted_at=1_700_000_010.0,
        ready_at=1_700_000_090.5,
    )
    return replace(job, **changes)


@dataclass
class ReceivedHook:
    """One request as the receiver saw it."""

    webhook_id: str
    timestamp: str
    body: bytes
    signature_ok: bool


@dataclass
class WebhookReceiver:
    """A loopback endpoint that checks signatures itself and answers from a script."""

    url: str
    secret: str
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[ReceivedHook] = field(default_factory=list)

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Queue the status of the next request; unscripted requests get 200."""
        self.script.append((status, headers or {}))


def standard_signature_ok(secret: str, headers: Any, body: bytes) -> bool:
    """Verify a Standard Webhooks signature from the spec, independently of the service code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.partition(",")[2] for s in headers.get("webhook-signature", "").split()]
    return any(hmac.compare_digest(expected, g) for g in given)


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="", secret=WEBHOOK_SECRET)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        receiver.received.append(
            ReceivedHook(
                webhook_id=request.headers.get("webhook-id", ""),
                timestamp=request.headers.get("webhook-timestamp", ""),
                body=body,
                signature_ok=standard_signature_ok(receiver.secret, request.headers, body),
            )
        )
        status, headers = receiver.script.pop(0) if receiver.script else (200, {})
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve_app(app) as url:
        receiver.url = f"{url}/hook"
        yield receiver
