"""Which deliveries are "the same event": pure, shared by the webhook and MQTT adapters.

Senders retry for hours to days, so the key must come from the sender's own delivery id where
it has one; otherwise from a configured field or header; and only as a last resort from the
bytes themselves (identical bytes are treated as a redelivery).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.parser

from service.config import SourceConfig

# The header each kind puts its unique delivery id in.
DELIVERY_ID_HEADERS: Mapping[str, str] = {
    "shopify": "x-shopify-webhook-id",
    "woocommerce": "x-wc-webhook-delivery-id",
    "standard": "webhook-id",
}
HEADER_PREFIX = "header:"
_DASHED_NAME = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)+")
_PLAIN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DedupeKeyError(ValueError):
    """The configured dedupe expression is invalid or found nothing usable in the event."""


@lru_cache(maxsize=256)
def compile_dedupe_expression(expression: str) -> jmespath.parser.ParsedResult:
    """Compile a JMESPath dedupe expression once; `check` calls this to report bad ones."""
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise DedupeKeyError(f"invalid JMESPath expression {expression!r}: {exc}") from exc


@lru_cache(maxsize=256)
def _plain_field(expression: str) -> bool:
    """Whether a JMESPath expression is a bare field name (`id`), read without JMESPath."""
    return _PLAIN_FIELD.fullmatch(expression) is not None


def search_dedupe_expression(expression: str, payload: Any) -> Any:  # noqa: ANN401 - JSON
    """What a dedupe expression finds in a payload, as JMESPath finds it.

    The usual expression is a bare field name; JMESPath's interpreter walks an AST for it
    (a twentieth of an MQTT message's CPU), a dict lookup gives the same answer.
    """
    if _plain_field(expression):
        return payload.get(expression) if isinstance(payload, dict) else None
    return compile_dedupe_expression(expression).search(payload)


def header_name_of(spec: str) -> str | None:
    """The header a dedupe spec names (`header:NAME`, or a dashed name JMESPath cannot parse)."""
    if spec.startswith(HEADER_PREFIX):
        return spec[len(HEADER_PREFIX) :].strip().lower()
    if _DASHED_NAME.fullmatch(spec):
        return spec.lower()
    return None


def _configured_key(spec: str, payload: Any, headers: Mapping[str, str]) -> str:  # noqa: ANN401 - a JSON payload
    name = header_name_of(spec)
    if name is not None:
        value = headers.get(name)
        if not value:
            raise DedupeKeyError(f"dedupe header {name!r} is missing")
        return f"h:{value}"
    if spec.lower() in headers:
        return f"h:{headers[spec.lower()]}"
    found = search_dedupe_expression(spec, payload)
    if found is None or found in ("", [], {}):
        raise DedupeKeyError(f"dedupe expression {spec!r} found nothing in the event")
    return f"j:{found}"


def dedupe_key(
    source: SourceConfig,
    *,
    payload: Any,  # noqa: ANN401 - a JSON payload
    headers: Mapping[str, str],
    body: bytes,
    topic: str | None = None,
    handler_event_id: str | None = None,
) -> str:
    """Derive the idempotency key of a delivery (unique per source)."""
    if source.dedupe_key:
        return _configured_key(source.dedupe_key, payload, headers)
    header = DELIVERY_ID_HEADERS.get(source.kind)
    if header and headers.get(header):
        return f"h:{headers[header]}"
    if source.kind in {"strapi", "contentful"} and handler_event_id:
        return f"e:{handler_event_id}"
    return body_key(body, topic)


def body_key(body: bytes, topic: str | None = None) -> str:
    """The last-resort key: identical bytes (on the same topic) are treated as a redelivery."""
    digest = hashlib.sha256()
    if topic is not None:
        digest.update(topic.encode())
        digest.update(b"\x00")
    digest.update(body)
    return f"b:{digest.hexdigest()}"


def event_id_for(handler_event_id: str | None, key: str) -> str:
    """The event id we answer with: the sender's own when it has one, else one from the key."""
    if handler_event_id:
        return handler_event_id
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:24]
