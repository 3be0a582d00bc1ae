"""The render cache's pure parts: what makes two exports "the same video".

Two jobs render the same video when their final export bodies are byte-identical in canonical
JSON (sorted keys, no whitespace), leaving out what differs per job by construction: the
export name (carried in the v3 body's `name`) and the callback URL (never in the body). The
key also names the API generation, since the same body means different things to each.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_PER_JOB_KEYS = frozenset({"name"})


def canonical_body(body: dict[str, Any]) -> bytes:
    """The body without its per-job keys, as sorted-key compact JSON."""
    kept = {key: value for key, value in body.items() if key not in _PER_JOB_KEYS}
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def render_key(api: str, body: dict[str, Any]) -> str:
    """The cache key of an export: its API generation and the digest of its canonical body."""
    digest = hashlib.sha256(canonical_body(body)).hexdigest()
    return f"{api}:{digest}"


def reuse_since(now: float, cache_s: float | None) -> float | None:
    """The earliest `ready_at` a reusable video may have; None when the route has no cache."""
    if cache_s is None or cache_s <= 0:
        return None
    return now - cache_s
