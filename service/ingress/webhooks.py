"""POST /hooks/{source}: a webhook delivery is verified, parsed and committed, then answered.

The answer is sent only after `Intake.accept` returned, so a 2xx always means the event is in
the inbox; a sender whose delivery failed for any reason gets a non-2xx and retries. Nothing
is read past the size limit or the deadline, and the signature is checked on the raw bytes
before anything is parsed.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from service.ingress.body import (
    BodyTimeoutError,
    BodyTooLargeError,
    BodyUnreadableError,
    read_body,
)
from service.ingress.dedupe import DELIVERY_ID_HEADERS
from service.ingress.signatures import (
    WOOCOMMERCE_HEADER,
    SignatureError,
    signature_headers,
    verify,
)
from service.log import get_logger
from service.model import Acceptance, EventStatus, RawEvent
from service.store.base import StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from service.config import SourceConfig
    from service.ingress.base import Intake

RETRY_AFTER_S = 5
"""What a 503 asks the sender to wait: the store is usually back within seconds."""

_PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_WOOCOMMERCE_PING = re.compile(rb"webhook_id=\d+")

_log = get_logger("ingress.webhooks")


def webhook_routes(
    *,
    sources: Mapping[str, SourceConfig],
    intake: Intake,
    max_body_bytes: int,
    body_timeout_s: float,
    clock: Callable[[], float] = time.time,
) -> list[web.RouteDef]:
    """Bind the webhook route to its collaborators, so the app only has to add it."""
    receiver = _Receiver(sources, intake, max_body_bytes, body_timeout_s, clock)
    return [web.post("/hooks/{source}", receiver.handle)]


class _RejectedError(Exception):
    """A delivery refused with an HTTP status; raised anywhere before the commit.

    `hang_up` closes the connection once the answer is sent, instead of aiohttp's lingering
    read of the rest of the body: right for a stalled or undecodable body, where there is
    nothing worth reading and lingering only keeps the connection (or logs a traceback).
    """

    def __init__(self, status: int, reason: str, *, hang_up: bool = False) -> None:
        self.status = status
        self.reason = reason
        self.hang_up = hang_up
        super().__init__(reason)


class _Receiver:
    """Turns one HTTP delivery into one intake commit, or into the error that explains why not."""

    def __init__(
        self,
        sources: Mapping[str, SourceConfig],
        intake: Intake,
        max_body_bytes: int,
        body_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._sources = dict(sources)
        self._hidden = {
            name: _PRIVATE_HEADERS | signature_headers(source) for name, source in sources.items()
        }
        self._intake = intake
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        try:
            return await self._receive(name, request)
        except _RejectedError as rejection:
            response = _reject(rejection.status, name, rejection.reason, _delivery_id(request))
            if rejection.hang_up:
                await _send_and_hang_up(request, response)
            return response

    async def _receive(self, name: str, request: web.Request) -> web.Response:
        source = self._sources.get(name)
        if source is None or source.kind == "mqtt":
            raise _RejectedError(404, f"unknown source {name!r}")
        body = await self._read(request)
        headers = _lower_case_headers(request)
        if _is_woocommerce_ping(source, body, headers):
            _log.info("webhook ping answered", source=name)
            return web.json_response({"ok": True}, status=200)
        try:
            verify(source, body, headers, self._clock())
        except SignatureError as exc:
            raise _RejectedError(401, exc.reason) from None
        raw = RawEvent(
            source=name, payload=_parse(body), headers=_passed_on(self._hidden[name], headers)
        )
        return await self._commit(source, raw, body)

    async def _read(self, request: web.Request) -> bytes:
        try:
            return await read_body(
                request, max_bytes=self._max_body_bytes, timeout_s=self._body_timeout_s
            )
        except BodyTooLargeError as exc:
            raise _RejectedError(413, str(exc)) from None
        except BodyTimeoutError as exc:
            raise _RejectedError(408, str(exc), hang_up=True) from None
        except BodyUnreadableError as exc:
            raise _RejectedError(400, str(exc), hang_up=True) from None

    async def _commit(self, source: SourceConfig, raw: RawEvent, body: bytes) -> web.Response:
        try:
            acceptance = await self._intake.accept(source, raw, body)
        except StoreUnavailableError as exc:
            response = _reject(503, source.name, f"store unavailable, retry later ({exc})")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        except Exception:  # noqa: BLE001 - a bug in the intake still gets a logged, JSON 500
            _log.exception("webhook failed", source=source.name, status=500)
            return web.json_response({"error": "internal error"}, status=500)
        # One line per delivery at debug: at info it cost about a tenth of the request's CPU;
        # the intake writes a summary line at info instead (README, Operations).
        _log.debug(
            "webhook accepted",
            source=source.name,
            event_id=acceptance.event_id,
            jobs=len(acceptance.job_ids),
            duplicate=acceptance.duplicate,
            outcome=str(acceptance.status),
        )
        return web.Response(
            body=orjson.dumps(_answer(acceptance)),
            status=200 if acceptance.duplicate else 202,
            content_type="application/json",
        )


def _answer(acceptance: Acceptance) -> dict[str, Any]:
    answer: dict[str, Any] = {"event_id": acceptance.event_id, "jobs": list(acceptance.job_ids)}
    if acceptance.status != EventStatus.ROUTED:
        answer["status"] = str(acceptance.status)
    return answer


def _delivery_id(request: web.Request) -> str | None:
    """The sender's own delivery id, so an operator can find a refused delivery in its logs."""
    return next(
        (request.headers[h] for h in DELIVERY_ID_HEADERS.values() if h in request.headers), None
    )


def _reject(status: int, source: str, reason: str, delivery_id: str | None = None) -> web.Response:
    _log.warning(
        "webhook rejected", source=source, status=status, reason=reason, delivery_id=delivery_id
    )
    return web.json_response({"error": reason}, status=status)


async def _send_and_hang_up(request: web.Request, response: web.Response) -> None:
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    # The transport flushes the answer before it closes.
    request.protocol.force_close()


def _parse(body: bytes) -> Any:  # noqa: ANN401 - a payload is any JSON object or array
    """Return the JSON payload; events are objects or arrays, anything else is unreadable.

    orjson reads the bytes and checks their UTF-8 itself, so the body is never copied into a
    str; only a body it refuses is decoded, to say which of the two was wrong.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise _RejectedError(400, "body is not UTF-8") from None
        raise _RejectedError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict | list):
        raise _RejectedError(400, "body must be a JSON object or array")
    return payload


def _lower_case_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        name = key.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _passed_on(hidden: frozenset[str], headers: Mapping[str, str]) -> dict[str, str]:
    """Headers worth keeping with the event: everything but credentials and signatures."""
    return {name: value for name, value in headers.items() if name not in hidden}


def _is_woocommerce_ping(source: SourceConfig, body: bytes, headers: Mapping[str, str]) -> bool:
    """WooCommerce checks a new webhook's URL with an unsigned form post; it carries no event."""
    return (
        source.kind == "woocommerce"
        and WOOCOMMERCE_HEADER not in headers
        and _WOOCOMMERCE_PING.fullmatch(body.strip()) is not None
    )
