"""Built-in handlers, one per source kind, in an explicit registry.

The registry is written out rather than discovered so a source kind maps to exactly one
reviewed function; a route may still name its own handler (`handler = "pkg.module:func"`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from handlers import contentful, generic, mqtt, shopify, standard, strapi, woocommerce
from handlers.base import HandlerError
from service.model import HandledEvent, RawEvent

Handler = Callable[[RawEvent], HandledEvent]

REGISTRY: Mapping[str, Handler] = MappingProxyType(
    {
        "shopify": shopify.handle,
        "woocommerce": woocommerce.handle,
        "strapi": strapi.handle,
        "contentful": contentful.handle,
        "standard": standard.handle,
        "hmac": generic.handle,
        "token": generic.handle,
        "json": generic.handle,
        "mqtt": mqtt.handle,
    }
)


def handler_for(kind: str) -> Handler:
    """The built-in handler of a source kind (the generic JSON one when it has none)."""
    return REGISTRY.get(kind) or REGISTRY["json"]


__all__ = ["REGISTRY", "Handler", "HandlerError", "handler_for"]
