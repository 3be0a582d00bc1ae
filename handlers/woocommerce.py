"""WooCommerce product webhooks (`product.created`, `product.updated`, ...).

WooCommerce names the delivery and the topic in `x-wc-webhook-delivery-id` and
`x-wc-webhook-topic`. Its product payload has no currency (a store setting), so that stays None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.base import build_context, dig, first, image_of, require_object, text
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a WooCommerce product webhook."""
    payload = require_object(event.payload, "WooCommerce")
    headers = event.headers
    product = {
        "title": text(payload.get("name")),
        "description": first(payload.get("description"), payload.get("short_description")),
        "price": first(payload.get("price"), payload.get("regular_price")),
        "currency": None,
        "image_url": image_of(payload.get("images")),
        "url": text(payload.get("permalink")),
        "vendor": text(dig(payload, "brands", 0, "name")),
        "handle": text(payload.get("slug")),
    }
    return HandledEvent(
        event_id=text(headers.get("x-wc-webhook-delivery-id")),
        event_type=text(headers.get("x-wc-webhook-topic")),
        context=build_context(
            source=event.source, payload=payload, headers=headers, product=product
        ),
    )
