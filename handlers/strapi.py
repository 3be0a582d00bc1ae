"""Strapi webhooks (`entry.create`, `entry.update`, `entry.publish`, ...).

Strapi sends no delivery id, so the event id is built from the entry: its model, its id
(`documentId` in Strapi 5) and `updatedAt`, plus the event name, since one edit can fire both
`entry.update` and `entry.publish`. A redelivery repeats all four; a new edit changes
`updatedAt`. Media URLs are passed on as Strapi gives them; with the local upload provider that
is a path (`/uploads/...`) the route has to prefix with the Strapi host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handlers.base import (
    build_context,
    dig,
    first,
    generic_product,
    image_of,
    plain_text,
    require_object,
    text,
)
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent

_IMAGE_FIELDS = ("cover", "image", "thumbnail", "featuredImage", "picture", "images", "media")
_BODY_FIELDS = ("content", "body", "blocks", "text", "description")


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a Strapi entry event; the entry feeds both `article` and `product`."""
    payload = require_object(event.payload, "Strapi")
    entry = payload.get("entry")
    entry = entry if isinstance(entry, dict) else {}
    image_url = next(filter(None, (_media_url(entry.get(f)) for f in _IMAGE_FIELDS)), None)
    product = generic_product(entry) | {"image_url": image_url}
    article = {
        "title": first(entry.get("title"), entry.get("name"), entry.get("headline")),
        "body": next(filter(None, (plain_text(entry.get(f)) for f in _BODY_FIELDS)), None),
        "image_url": image_url,
        "url": text(entry.get("url")),
    }
    return HandledEvent(
        event_id=_event_id(payload, entry),
        event_type=text(payload.get("event")),
        context=build_context(
            source=event.source,
            payload=payload,
            headers=event.headers,
            product=product,
            article=article,
        ),
    )


def _event_id(payload: dict[str, Any], entry: dict[str, Any]) -> str | None:
    entry_id = first(entry.get("documentId"), entry.get("id"))
    updated_at = text(entry.get("updatedAt"))
    if entry_id is None or updated_at is None:
        return None
    model = first(payload.get("uid"), payload.get("model")) or "entry"
    kind = text(payload.get("event")) or "event"
    return f"{model}:{entry_id}@{updated_at}:{kind}"


def _media_url(value: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """Strapi media: `{url}` in webhooks, `{data: {attributes: {url}}}` in v4 REST shapes."""
    nested = dig(value, "data")
    if nested is not None:
        return _media_url(dig(nested, "attributes") or nested)
    return image_of(value)
