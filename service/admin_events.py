"""The inbox over HTTP: list and show events (dead letters above all), and replay them.

An operator fixes a route or a handler, restarts, and replays what failed: the replay runs the
stored delivery through the configuration of the day and never pays for a job that exists.
`studiohook events` is a client of these routes, so both show the same thing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiohttp import web

from service.log import get_logger, masked
from service.model import EventStatus, Replay, StoredEvent
from service.store.base import Store

log = get_logger("admin.events")


class ReplayEvent(Protocol):
    """Replays one inbox row through the current configuration; LookupError when it is gone."""

    def __call__(self, row: int, *, rerender: bool = False) -> Awaitable[Replay]:
        """See `StoreIntake.replay`."""
        ...


MAX_PAGE = 500
_SECRET_HEADER = re.compile(
    r"authorization|cookie|signature|hmac|token|secret|password|passwd|api[-_]?key|user[-_]?key",
    re.IGNORECASE,
)
REDACTED = "***"


def parse_since(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise); ValueError if neither."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def redacted_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as an operator may see them: credentials masked by name and by known value."""
    return {
        name: REDACTED if _SECRET_HEADER.search(name) else str(masked(value))
        for name, value in headers.items()
    }


def event_summary(event: StoredEvent) -> dict[str, Any]:
    """One line of a listing: identity, outcome and why, without the body."""
    return {
        "id": event.id,
        "event_id": event.event_id,
        "source": event.source,
        "event_type": event.event_type,
        "status": str(event.status),
        "failed_step": event.failed_step,
        "reason": masked(event.reason),
        "received_at": event.received_at,
        "replays": event.replays,
        "body_bytes": len(event.body),
    }


def event_detail(event: StoredEvent) -> dict[str, Any]:
    """Everything kept of one delivery, secrets masked; a body that is not JSON as text."""
    detail = event_summary(event)
    detail["headers"] = redacted_headers(event.headers)
    try:
        detail["payload"] = masked(orjson.loads(event.body))
    except orjson.JSONDecodeError:
        text = event.body.decode("utf-8", "replace")
        detail["payload_text"] = masked(text)
        detail["payload_base64"] = base64.b64encode(event.body).decode()
    return detail


def replay_view(result: Replay) -> dict[str, Any]:
    """What a replay did, route by route."""
    return {
        "event": event_summary(result.event),
        "duplicate_of": result.duplicate_of,
        "jobs": [
            {
                "job_id": j.job_id,
                "route": j.route,
                "state": str(j.state),
                "created": j.created,
                "rerendered": j.rerendered,
            }
            for j in result.jobs
        ],
    }


def _json(data: Any, status: int = 200) -> web.Response:  # noqa: ANN401 - any JSON value
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class EventsApi:
    """`GET /events`, `GET /events/{id}`, `POST /events/{id}/replay` behind the admin token.

    `{id}` is the inbox row number that listings show, or an event id when it names one row.
    """

    def __init__(
        self, store: Store, replay: ReplayEvent, authorised: Callable[[web.Request], bool]
    ) -> None:
        self._store = store
        self._replay = replay
        self._authorised = authorised

    def routes(self) -> list[web.RouteDef]:
        """The inbox routes."""
        return [
            web.get("/events", self.list_events),
            web.get("/events/{ref}", self.show_event),
            web.post("/events/{ref}/replay", self.replay_event),
        ]

    async def list_events(self, request: web.Request) -> web.Response:
        """`?status=&source=&since=&limit=&cursor=`: newest first, `next` for the next page."""
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        query = request.query
        try:
            status = EventStatus(query["status"]) if "status" in query else None
            since = parse_since(query["since"]) if "since" in query else None
            limit = max(1, min(MAX_PAGE, int(query.get("limit", "50"))))
            cursor = int(query["cursor"]) if "cursor" in query else None
        except ValueError as exc:
            return _json({"error": f"bad query: {exc}"}, status=400)
        events = await self._store.list_events(
            status=status,
            source=query.get("source"),
            since=since,
            event_id=query.get("event_id"),
            limit=limit,
            cursor=cursor,
        )
        following = events[-1].id if len(events) == limit else None
        return _json({"events": [event_summary(e) for e in events], "next": following})

    async def _event_or_error(self, request: web.Request) -> StoredEvent | web.Response:
        if not self._authorised(request):
            return _json({"error": "admin token required"}, status=401)
        ref = request.match_info["ref"]
        if ref.isdecimal():
            event = await self._store.get_event(int(ref))
            if event is not None:
                return event
        found = await self._store.list_events(event_id=ref, limit=MAX_PAGE)
        if len(found) > 1:
            rows = ", ".join(str(e.id) for e in found)
            return _json(
                {"error": f"event id {ref!r} names several events ({rows}): use the row number"},
                status=409,
            )
        if not found:
            return _json({"error": f"no event {ref}"}, status=404)
        return found[0]

    async def show_event(self, request: web.Request) -> web.Response:
        """One event with its headers and payload, secrets masked."""
        event = await self._event_or_error(request)
        if isinstance(event, web.Response):
            return event
        return _json(event_detail(event))

    async def replay_event(self, request: web.Request) -> web.Response:
        """Run the event through the current configuration; `{"rerender": true}` pays again."""
        event = await self._event_or_error(request)
        if isinstance(event, web.Response):
            return event
        rerender = request.query.get("rerender", "").lower() in {"1", "true", "yes"}
        if request.can_read_body:
            try:
                options = orjson.loads(await request.read() or b"{}")
            except orjson.JSONDecodeError:
                return _json({"error": "body must be a JSON object"}, status=400)
            if not isinstance(options, dict):
                return _json({"error": "body must be a JSON object"}, status=400)
            rerender = rerender or options.get("rerender") is True
        try:
            result = await self._replay(event.id, rerender=rerender)
        except LookupError:
            return _json({"error": f"no event {event.id}"}, status=404)
        log.info("event.replay_requested", event_id=event.event_id, row=event.id, rerender=rerender)
        return _json(replay_view(result))
