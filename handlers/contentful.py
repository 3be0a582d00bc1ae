"""Contentful webhooks (`ContentManagement.Entry.publish`, `...Asset.publish`, ...).

The topic is the `x-contentful-topic` header. The event id is the entity's `sys.id` and
version (`sys.version`, or `sys.revision` in the published shape) plus the action, since a
publish and an unpublish can carry the same version. Fields arrive per locale
(`fields.title["en-US"]`): `en-US` is used when present, else the first locale. Rich text is
flattened to plain text; an image field that is a link to an asset has no URL in the payload,
so it stays None (an Asset event itself does carry its file URL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handlers.base import (
    build_context,
    dig,
    first,
    generic_product,
    plain_text,
    require_object,
    text,
)
from service.model import HandledEvent

if TYPE_CHECKING:
    from service.model import RawEvent

PREFERRED_LOCALE = "en-US"


def handle(event: RawEvent) -> HandledEvent:
    """Normalise a Contentful entry or asset event; the entry feeds `article` and `product`."""
    payload = require_object(event.payload, "Contentful")
    topic = text(event.headers.get("x-contentful-topic"))
    raw_fields = payload.get("fields")
    fields = (
        {name: _localized(value) for name, value in raw_fields.items()}
        if isinstance(raw_fields, dict)
        else {}
    )
    image_url = _asset_url(fields.get("file")) if dig(payload, "sys", "type") == "Asset" else None
    product = generic_product(fields)
    if image_url:
        product["image_url"] = image_url
    article = {
        "title": first(fields.get("title"), fields.get("name"), fields.get("headline")),
        "body": next(
            filter(None, (plain_text(fields.get(f)) for f in ("body", "content", "text"))), None
        ),
        "image_url": product["image_url"],
        "url": first(fields.get("url")),
    }
    product["description"] = product["description"] or article["body"]
    return HandledEvent(
        event_id=_event_id(payload, topic),
        event_type=topic,
        context=build_context(
            source=event.source,
            payload=payload,
            headers=event.headers,
            product=product,
            article=article,
        ),
    )


def _event_id(payload: dict[str, Any], topic: str | None) -> str | None:
    entity_id = text(dig(payload, "sys", "id"))
    version = first(dig(payload, "sys", "version"), dig(payload, "sys", "revision"))
    if entity_id is None or version is None:
        return None
    action = topic.rsplit(".", 1)[-1] if topic else "event"
    return f"{entity_id}:{version}:{action}"


def _localized(value: Any) -> Any:  # noqa: ANN401 - parsed JSON
    if not isinstance(value, dict) or not value or "sys" in value or "nodeType" in value:
        return value
    if PREFERRED_LOCALE in value:
        return value[PREFERRED_LOCALE]
    return next(iter(value.values()))


def _asset_url(file: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    url = text(dig(file, "url"))
    if url and url.startswith("//"):
        return "https:" + url
    return url
