"""Plain JSON deliveries (`json`, `hmac`, `token` sources): no vendor conventions to rely on.

The event id is the payload's `id` when it has one (else the source's `dedupe_key` decides),
the type its `type` or `event` field. Any JSON value is accepted: a payload that is not an
object simply has no product fields, and routes can still read it as `event`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handlers.base import build_context, first, generic_product, text
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a plain JSON delivery."""
    return handle_payload(event, event_type=None)


def handle_payload(event: RawEvent, event_type: str | None) -> HandledEvent:
    """Normalise a plain JSON payload; `event_type` overrides the payload's own type."""
    payload: Any = event.payload
    is_object = isinstance(payload, dict)
    return HandledEvent(
        event_id=text(payload.get("id")) if is_object else None,
        event_type=event_type
        or (first(payload.get("type"), payload.get("event")) if is_object else None),
        context=build_context(
            source=event.source,
            payload=payload,
            headers=event.headers,
            product=generic_product(payload) if is_object else None,
        ),
    )
