"""What every handler shares: the error for unusable payloads and the context skeleton.

A handler turns one verified delivery into an id, a type and a context that routes read
without knowing the source. Every normalised field is always present (None when the source
does not have it), so a route reading `product.vendor` fails on "is null" with a clear message
rather than on a key that exists for one source and not another.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

PRODUCT_FIELDS = (
    "title",
    "description",
    "price",
    "currency",
    "image_url",
    "url",
    "vendor",
    "handle",
)
ARTICLE_FIELDS = ("title", "body", "image_url", "url")

# Headers that carry credentials never reach the context: an expression could otherwise put a
# token into a project name or a script that leaves for AI Studios.
_SECRET_HEADER = re.compile(
    r"authorization|cookie|signature|hmac|token|secret|api-key", re.IGNORECASE
)


class HandlerError(ValueError):
    """A payload the handler cannot use at all (not a JSON object, say)."""


def require_object(payload: Any, what: str) -> dict[str, Any]:  # noqa: ANN401 - parsed JSON
    """Return the payload if it is a JSON object; raise HandlerError naming the source if not."""
    if not isinstance(payload, dict):
        kind = "null" if payload is None else type(payload).__name__
        raise HandlerError(f"{what} payload must be a JSON object, not {kind}")
    return payload


def text(value: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """A scalar as a non-empty string, else None (ids arrive as numbers from some sources)."""
    if type(value) is str:  # the usual case first: no conversion, no union isinstance
        return value.strip() or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int | float):
        result = str(value).strip()
        return result or None
    return None


def first(*values: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """The first of `values` that is a usable string."""
    for value in values:
        result = text(value)
        if result is not None:
            return result
    return None


def dig(node: Any, *path: str | int) -> Any:  # noqa: ANN401 - parsed JSON
    """Follow `path` through objects and lists; None where anything is missing."""
    for part in path:
        if isinstance(part, int) and isinstance(node, list) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def image_of(node: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """An image URL from the usual spellings: a string, `{src}`, `{url}` or a list of those."""
    if isinstance(node, list):
        return next((url for url in map(image_of, node) if url), None)
    if isinstance(node, dict):
        return first(node.get("src"), node.get("url"), node.get("source_url"))
    return text(node)


@functools.lru_cache(maxsize=1024)
def _is_secret(name: str) -> bool:
    """Whether a header name carries credentials (cached: senders repeat the same few names).

    The regular expression then runs once per name, not once per header of every delivery.
    """
    return _SECRET_HEADER.search(name) is not None


def safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The delivery's headers for expressions, without credentials."""
    return {k: v for k, v in headers.items() if not _is_secret(k)}


def build_context(
    *,
    source: str,
    payload: Any,  # noqa: ANN401 - parsed JSON
    headers: Mapping[str, str],
    product: Mapping[str, Any] | None = None,
    article: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the context every route sees, with every normalised field present."""
    product = product or {}
    article = article or {}
    return {
        "product": {name: product.get(name) for name in PRODUCT_FIELDS},
        "article": {name: article.get(name) for name in ARTICLE_FIELDS},
        "event": payload,
        "headers": safe_headers(headers),
        "source": source,
    }


def generic_product(payload: dict[str, Any]) -> dict[str, Any]:
    """Product fields from a plain JSON payload, trying the spellings people commonly use.

    Looks inside `product` or `data` when the payload wraps the product in one of them.
    """
    node = payload
    for wrapper in ("product", "data"):
        if isinstance(payload.get(wrapper), dict):
            node = payload[wrapper]
            break
    price = node.get("price")
    return {
        "title": first(node.get("title"), node.get("name")),
        "description": first(node.get("description"), node.get("body_html"), node.get("body")),
        "price": price
        if isinstance(price, str | int | float) and not isinstance(price, bool)
        else None,
        "currency": first(node.get("currency"), payload.get("currency")),
        "image_url": image_of(node.get("image_url"))
        or image_of(node.get("imageUrl"))
        or image_of(node.get("image"))
        or image_of(node.get("images")),
        "url": first(node.get("url"), node.get("permalink"), node.get("link")),
        "vendor": first(node.get("vendor"), node.get("brand")),
        "handle": first(node.get("handle"), node.get("slug")),
    }


_BLOCK_NODES = frozenset(
    {"document", "list", "unordered-list", "ordered-list", "list-item", "blockquote"}
)


def plain_text(node: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """Flatten a CMS rich-text tree (Strapi blocks, Contentful rich text) to readable text.

    Strings pass through untouched (HTML included: the mapping strips it where wanted).
    """
    result = _flatten(node).strip()
    return result or None


def _flatten(node: Any) -> str:  # noqa: ANN401 - parsed JSON
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "\n".join(part for part in map(_flatten, node) if part.strip())
    leaf = _leaf_text(node)
    if leaf is not None:
        return leaf
    children = node.get("children") or node.get("content") if isinstance(node, dict) else None
    if not isinstance(children, list):
        return ""
    kind = node.get("nodeType") or node.get("type")
    glue = "\n" if kind in _BLOCK_NODES else ""
    return glue.join(_flatten(child) for child in children)


def _leaf_text(node: Any) -> str | None:  # noqa: ANN401 - parsed JSON
    """The text of a Strapi (`{text}`) or Contentful (`{nodeType: text, value}`) leaf."""
    if not isinstance(node, dict):
        return None
    if isinstance(node.get("text"), str):
        return str(node["text"])
    if node.get("nodeType") == "text" and isinstance(node.get("value"), str):
        return str(node["value"])
    return None
