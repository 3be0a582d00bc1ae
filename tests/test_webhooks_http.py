"""POST /hooks/{source} over real loopback HTTP, with a recording intake standing in for the store.

Every rejection also asserts the intake was never called: nothing is stored for it.
"""

import base64
import gzip
import hashlib
import hmac
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from service.config import SourceConfig
from service.ingress.signatures import sign_standard
from service.ingress.webhooks import webhook_routes
from service.model import Acceptance, EventStatus, RawEvent
from service.store.base import StoreUnavailableError
from tests.support.loopback import serve_app

SHOP_SECRET = "shpss_3f9a0c77b1"
STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WOO_SECRET = "woo-secret-5521"
MAX_BODY = 4096
BODY_TIMEOUT_S = 0.5
NOW = 1_700_000_000.0

SOURCES = {
    "shop": SourceConfig(name="shop", kind="shopify", secrets=("old-secret-1", SHOP_SECRET)),
    "std": SourceConfig(name="std", kind="standard", secrets=(STD_SECRET,)),
    "woo": SourceConfig(name="woo", kind="woocommerce", secrets=(WOO_SECRET,)),
    "plain": SourceConfig(name="plain", kind="json"),
    "sensors": SourceConfig(name="sensors", kind="mqtt", topic="sensors/#"),
}

pytestmark = pytest.mark.anyio


@dataclass
class RecordingIntake:
    """Records what it is asked to commit; recognises a repeated body as a duplicate."""

    unavailable: bool = False
    broken: bool = False
    status: EventStatus = EventStatus.ROUTED
    timeline: list[str] = field(default_factory=list)
    accepted: list[tuple[SourceConfig, RawEvent, bytes]] = field(default_factory=list)
    seen: dict[bytes, Acceptance] = field(default_factory=dict)

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        if self.unavailable:
            raise StoreUnavailableError("database is locked")
        if self.broken:
            raise RuntimeError("a bug in the intake")
        await anyio.sleep(0.05)  # a commit takes a while; the answer must wait for it
        self.timeline.append("committed")
        if body in self.seen:
            original = self.seen[body]
            return Acceptance(original.event_id, original.job_ids, duplicate=True)
        self.accepted.append((source, raw, body))
        jobs = ("job_1",) if self.status == EventStatus.ROUTED else ()
        acceptance = Acceptance(f"evt_{len(self.accepted)}", jobs, False, self.status)
        self.seen[body] = acceptance
        return acceptance

    async def dead_letter(self, *_args, **_kwargs) -> Acceptance:
        raise AssertionError("webhooks never dead-letter")


@dataclass
class Server:
    url: str
    port: int
    intake: RecordingIntake


@asynccontextmanager
async def serving(
    intake: RecordingIntake | None = None, max_body_bytes: int = MAX_BODY
) -> AsyncIterator[Server]:
    intake = intake or RecordingIntake()
    app = web.Application()
    app.add_routes(
        webhook_routes(
            sources=SOURCES,
            intake=intake,
            max_body_bytes=max_body_bytes,
            body_timeout_s=BODY_TIMEOUT_S,
            clock=lambda: NOW,
        )
    )
    async with serve_app(app, shutdown_timeout=1) as url:
        yield Server(url, int(url.rpartition(":")[2]), intake)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serving() as running:
        yield running


async def post(server: Server, path: str, body: bytes, headers=None):
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + path, data=body, headers=headers or {}) as response,
    ):
        return response.status, await response.json(), response.headers


def shopify_signature(body: bytes, secret: str = SHOP_SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


ORDER = b'{"id": 820982911946154508, "title": "Red shoe"}'


def shop_headers(body: bytes = ORDER) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Hmac-Sha256": shopify_signature(body),
        "X-Shopify-Topic": "products/create",
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        "Authorization": "Basic c2VjcmV0",
        "Cookie": "session=abc",
    }


# --- accepted -----------------------------------------------------------------------------


async def test_signed_delivery_is_committed_then_answered_202(server):
    status, answer, _ = await post(server, "/hooks/shop", ORDER, shop_headers())
    assert (status, answer) == (202, {"event_id": "evt_1", "jobs": ["job_1"]})
    [(source, raw, body)] = server.intake.accepted
    assert source is SOURCES["shop"]
    assert body == ORDER
    assert raw.source == "shop"
    assert raw.payload == {"id": 820982911946154508, "title": "Red shoe"}
    assert raw.headers["x-shopify-topic"] == "products/create"
    assert raw.headers["x-shopify-webhook-id"] == "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"
    assert all(name == name.lower() for name in raw.headers)
    for hidden in ("x-shopify-hmac-sha256", "authorization", "cookie"):
        assert hidden not in raw.headers


async def test_the_answer_is_sent_only_after_the_commit(server):
    status, _, _ = await post(server, "/hooks/plain", b"{}")
    server.intake.timeline.append("answered")
    assert status == 202
    assert server.intake.timeline == ["committed", "answered"]


async def test_duplicate_is_answered_200_with_the_original_id(server):
    first = await post(server, "/hooks/shop", ORDER, shop_headers())
    again = await post(server, "/hooks/shop", ORDER, shop_headers())
    assert first[:2] == (202, {"event_id": "evt_1", "jobs": ["job_1"]})
    assert again[:2] == (200, {"event_id": "evt_1", "jobs": ["job_1"]})
    assert len(server.intake.accepted) == 1


async def test_an_event_no_route_wants_says_so():
    async with serving(RecordingIntake(status=EventStatus.IGNORED)) as server:
        status, answer, _ = await post(server, "/hooks/plain", b"[1, 2]")
    assert (status, answer) == (202, {"event_id": "evt_1", "jobs": [], "status": "ignored"})


async def test_standard_webhook_signed_for_the_service_clock(server):
    body = b'{"type": "product.created", "data": {"id": 1}}'
    headers = {
        "webhook-id": "msg_2x",
        "webhook-timestamp": str(int(NOW)),
        "webhook-signature": sign_standard(STD_SECRET, "msg_2x", int(NOW), body),
    }
    status, _, _ = await post(server, "/hooks/std", body, headers)
    assert status == 202
    [(_, raw, _)] = server.intake.accepted
    assert raw.headers["webhook-id"] == "msg_2x"
    assert raw.headers["webhook-timestamp"] == str(int(NOW))
    assert "webhook-signature" not in raw.headers


async def test_gzip_body_is_verified_and_stored_decompressed(server):
    headers = shop_headers() | {"Content-Encoding": "gzip"}
    status, _, _ = await post(server, "/hooks/shop", gzip.compress(ORDER), headers)
    assert status == 202
    assert server.intake.accepted[0][2] == ORDER


async def test_woocommerce_creation_ping_is_acknowledged_and_not_stored(server):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, answer, _ = await post(server, "/hooks/woo", b"webhook_id=17", headers)
    assert (status, answer) == (200, {"ok": True})
    assert server.intake.accepted == []


# --- rejected: nothing stored ---------------------------------------------------------------


async def test_unknown_and_mqtt_sources_are_404(server):
    for path in ("/hooks/nobody", "/hooks/sensors"):
        status, answer, _ = await post(server, path, b"{}")
        assert status == 404
        assert "unknown source" in answer["error"]
    assert server.intake.accepted == []


async def test_bad_or_missing_signature_is_401_and_logged_without_secrets(server):
    tampered = shop_headers(ORDER.replace(b"Red", b"Blue"))
    with capture_logs() as logs:
        bad = await post(server, "/hooks/shop", ORDER, tampered)
        missing = await post(server, "/hooks/shop", ORDER, {"X-Shopify-Topic": "products/create"})
    assert bad[:2] == (401, {"error": "signature does not match"})
    assert missing[:2] == (401, {"error": "missing x-shopify-hmac-sha256 header"})
    assert server.intake.accepted == []
    rejected = [line for line in logs if line["event"] == "webhook rejected"]
    assert [(line["source"], line["status"]) for line in rejected] == [("shop", 401), ("shop", 401)]
    text = repr(logs)
    assert SHOP_SECRET not in text
    assert tampered["X-Shopify-Hmac-Sha256"] not in text


async def test_stale_standard_webhook_is_401(server):
    body = b'{"type": "x"}'
    old = int(NOW) - 3600
    headers = {
        "webhook-id": "msg_old",
        "webhook-timestamp": str(old),
        "webhook-signature": sign_standard(STD_SECRET, "msg_old", old, body),
    }
    status, answer, _ = await post(server, "/hooks/std", body, headers)
    assert (status, answer) == (401, {"error": "webhook-timestamp is too old"})
    assert server.intake.accepted == []


async def test_woocommerce_ping_lookalike_with_a_bad_signature_is_401(server):
    headers = {"X-WC-Webhook-Signature": "AAAA"}
    status, _, _ = await post(server, "/hooks/woo", b"webhook_id=17", headers)
    assert status == 401
    status, _, _ = await post(server, "/hooks/woo", b"webhook_id=17&x=1")
    assert status == 401
    assert server.intake.accepted == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"id": 1', "body is not valid JSON"),
        (b'{"name": "caf\xe9"}', "body is not UTF-8"),
        (b'"just a string"', "body must be a JSON object or array"),
        (b"42", "body must be a JSON object or array"),
        (b"", "body is not valid JSON"),
    ],
)
async def test_unreadable_body_is_400(server, body, error):
    status, answer, _ = await post(server, "/hooks/plain", body)
    assert status == 400
    assert answer["error"].startswith(error)
    assert server.intake.accepted == []


async def test_signature_is_checked_before_parsing(server):
    body = b"not json"
    status, answer, _ = await post(server, "/hooks/shop", body, shop_headers(body))
    assert status == 400
    assert answer["error"].startswith("body is not valid JSON")
    status, _, _ = await post(server, "/hooks/shop", body, shop_headers(b"other"))
    assert status == 401


async def test_broken_gzip_is_400(server):
    headers = {"Content-Encoding": "gzip"}
    status, answer, _ = await post(server, "/hooks/plain", b"this was never gzip", headers)
    assert status == 400
    assert "could not be decoded" in answer["error"]
    assert server.intake.accepted == []


async def test_store_unavailable_is_503_with_retry_after():
    async with serving(RecordingIntake(unavailable=True)) as server:
        status, answer, headers = await post(server, "/hooks/shop", ORDER, shop_headers())
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert "store unavailable" in answer["error"]


async def test_an_intake_bug_is_a_json_500_not_a_2xx():
    async with serving(RecordingIntake(broken=True)) as server:
        with capture_logs() as logs:
            status, answer, _ = await post(server, "/hooks/plain", b"{}")
    assert (status, answer) == (500, {"error": "internal error"})
    assert any(line["event"] == "webhook failed" for line in logs)


async def test_oversized_json_body_is_413(server):
    body = b'{"pad": "' + b"x" * MAX_BODY + b'"}'
    status, answer, _ = await post(server, "/hooks/plain", body)
    assert status == 413
    assert "limit" in answer["error"]
    assert server.intake.accepted == []


# --- raw sockets: what a misbehaving sender does ---------------------------------------------


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes, bool]:
    """Send `request` as is (maybe an unfinished body) and read one response.

    Also says whether the server then hung up (only waited for when the answer asks to close).
    """
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive()
        hung_up = False
        if b"connection: close" in head.lower():
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                hung_up = True
        return int(head.split(b" ", 2)[1]), body, hung_up


async def test_content_length_over_the_limit_is_413_before_any_body_is_sent(server):
    request = (
        b"POST /hooks/plain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    with anyio.fail_after(5):
        status, body, _ = await raw_exchange(server.port, request)
    assert status == 413
    assert b"10000000 bytes" in body
    assert server.intake.accepted == []


async def test_chunked_stream_over_the_limit_stops_reading_at_the_limit(server):
    chunk = b"x" * 1024
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // 1024 + 1))
    request = (
        b"POST /hooks/plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    )
    # The terminating chunk is never sent: the answer must come without the end of the body.
    with anyio.fail_after(5):
        status, _, _ = await raw_exchange(server.port, request)
    assert status == 413
    assert server.intake.accepted == []


async def test_slow_body_is_408_within_the_timeout(server):
    request = (
        b"POST /hooks/plain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"id": '
    )
    started = time.monotonic()
    with anyio.fail_after(BODY_TIMEOUT_S + 2):
        status, body, hung_up = await raw_exchange(server.port, request)
    elapsed = time.monotonic() - started
    assert status == 408
    assert hung_up, "a stalled sender must not keep the connection"
    assert b"not received within" in body
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < BODY_TIMEOUT_S + 1
    assert server.intake.accepted == []


async def test_gzip_bomb_is_413_without_inflating_it():
    limit = 64 * 1024
    bomb = gzip.compress(b"\0" * (10 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < limit  # passes the Content-Length check: only inflating reveals it
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with serving(max_body_bytes=limit) as server:
        tracemalloc.start()
        try:
            started = time.monotonic()
            status, answer, _ = await post(server, "/hooks/plain", bomb, headers)
            elapsed = time.monotonic() - started
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == 413
    assert "limit" in answer["error"]
    assert elapsed < 2
    # About 2.4 MB on aiohttp 3.14 whatever the bomb's size: decompression buffers, no body.
    assert peak_bytes < 5 * 1024 * 1024, "the 10 MB body was inflated in memory"
    assert server.intake.accepted == []
