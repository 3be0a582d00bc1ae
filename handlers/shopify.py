"""Shopify product webhooks (REST payloads: `products/create`, `products/update`, ...).

The delivery id and topic come from Shopify's headers. Product payloads carry no currency and
no storefront URL: the currency is taken from `x-shopify-shop-currency` when a proxy adds it,
and the URL is built from `x-shopify-shop-domain` and the product handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.base import build_context, dig, first, image_of, require_object, text
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a Shopify product webhook; the price is the first variant's, as listed."""
    payload = require_object(event.payload, "Shopify")
    headers = event.headers
    handle_ = text(payload.get("handle"))
    domain = text(headers.get("x-shopify-shop-domain"))
    product = {
        "title": text(payload.get("title")),
        "description": text(payload.get("body_html")),
        "price": text(dig(payload, "variants", 0, "price")),
        "currency": text(headers.get("x-shopify-shop-currency")),
        "image_url": image_of(payload.get("image")) or image_of(payload.get("images")),
        "url": f"https://{domain}/products/{handle_}" if domain and handle_ else None,
        "vendor": text(payload.get("vendor")),
        "handle": handle_,
    }
    return HandledEvent(
        event_id=first(headers.get("x-shopify-webhook-id"), headers.get("x-shopify-event-id")),
        event_type=text(headers.get("x-shopify-topic")),
        context=build_context(
            source=event.source, payload=payload, headers=headers, product=product
        ),
    )
