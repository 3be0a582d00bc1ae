"""Standard Webhooks deliveries (`webhook-id` header, `{"type", "timestamp", "data"}` body).

The `webhook-id` header is the same on every retry of one message, which is exactly the
dedupe key the spec intends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.base import build_context, generic_product, require_object, text
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a Standard Webhooks message; product fields are read from `data`."""
    payload = require_object(event.payload, "Standard Webhooks")
    return HandledEvent(
        event_id=text(event.headers.get("webhook-id")),
        event_type=text(payload.get("type")),
        context=build_context(
            source=event.source,
            payload=payload,
            headers=event.headers,
            product=generic_product(payload),
        ),
    )
