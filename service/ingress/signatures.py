"""Webhook signature checks, one per source kind, on the raw body bytes.

Every export is billed, so a delivery nobody can vouch for must never reach the inbox: each
check fails closed (a kind that needs a secret and has none rejects everything), compares in
constant time, and accepts any configured secret so a secret can be rotated without downtime.
Pure: no I/O, the clock is a parameter.

Strapi, Contentful and plain JSON sources are unsigned by default. When secrets are configured
on them they are checked as a shared token in `source.token_header` (default Authorization):
Strapi sends static headers configured per webhook, and Contentful's "secret header" option
is the same idea. Contentful's newer request signing covers the method and path, which this
body-level check does not see, so it is not used.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping

from service.config import SourceConfig

STANDARD_TOLERANCE_S = 300
"""Standard Webhooks: how far a delivery's timestamp may be from now (replay window)."""

SHOPIFY_HEADER = "x-shopify-hmac-sha256"
WOOCOMMERCE_HEADER = "x-wc-webhook-signature"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
_WHSEC_PREFIX = "whsec_"
_BEARER = "bearer "
_TOKEN_KINDS = frozenset({"token", "strapi", "contentful", "json"})
_UNSIGNED_KINDS = frozenset({"strapi", "contentful", "json", "mqtt"})

_Check = Callable[[SourceConfig, bytes, Mapping[str, str], float], None]


class SignatureError(Exception):
    """A delivery failed verification; `reason` is safe to log and to answer with."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def verify(source: SourceConfig, body: bytes, headers: Mapping[str, str], now: float) -> None:
    """Raise SignatureError unless the delivery is vouched for by one of the source's secrets.

    `headers` must have lower-case names. `now` is unix seconds (for replay windows).
    """
    if source.kind == "mqtt" or (source.kind in _UNSIGNED_KINDS and not source.secrets):
        return
    check = _CHECKS.get(source.kind)
    if check is None:
        raise SignatureError(f"source kind {source.kind!r} cannot be verified")
    if not source.secrets:
        raise SignatureError("no secret configured for this source")
    check(source, body, headers, now)


def signature_headers(source: SourceConfig) -> frozenset[str]:
    """Lower-case names of the headers that carry this source's proof: never stored or passed on."""
    names = {SHOPIFY_HEADER, WOOCOMMERCE_HEADER, STANDARD_SIGNATURE_HEADER}
    if source.signature_header:
        names.add(source.signature_header.lower())
    if source.kind in _TOKEN_KINDS:
        names.add(source.token_header.lower())
    return frozenset(names)


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Sign one message the way Standard Webhooks receivers check it (the `webhook-signature`).

    Raises ValueError when the secret is not `whsec_<base64>` or plain base64.
    """
    key = _standard_key(secret)
    if key is None:
        raise ValueError("Standard Webhooks secret must be whsec_<base64> or base64")
    return "v1," + base64.b64encode(_standard_digest(key, msg_id, str(timestamp), body)).decode()


# --- per kind ----------------------------------------------------------------------------


def _verify_base64_hmac(header: str) -> _Check:
    def check(source: SourceConfig, body: bytes, headers: Mapping[str, str], _now: float) -> None:
        given = _decode_base64(_required(headers, header), header)
        _match_any(given, (_hmac_sha256(s.encode(), body) for s in source.secrets))

    return check


def _verify_generic_hmac(
    source: SourceConfig, body: bytes, headers: Mapping[str, str], _now: float
) -> None:
    if not source.signature_header:
        raise SignatureError("no signature header configured for this source")
    header = source.signature_header.lower()
    value = _required(headers, header).strip()
    prefix = source.signature_prefix
    if prefix:
        if not value.startswith(prefix):
            raise SignatureError(f"{header} does not start with {prefix!r}")
        value = value[len(prefix) :]
    if source.signature_encoding == "base64":
        given = _decode_base64(value, header)
    else:
        try:
            given = bytes.fromhex(value)
        except ValueError:
            raise SignatureError(f"{header} is not hex") from None
    _match_any(given, (_hmac_sha256(s.encode(), body) for s in source.secrets))


def _verify_standard(
    source: SourceConfig, body: bytes, headers: Mapping[str, str], now: float
) -> None:
    msg_id = _required(headers, STANDARD_ID_HEADER)
    timestamp = _required(headers, STANDARD_TIMESTAMP_HEADER).strip()
    signature = _required(headers, STANDARD_SIGNATURE_HEADER)
    if not timestamp.isdigit():
        raise SignatureError(f"{STANDARD_TIMESTAMP_HEADER} is not unix seconds")
    age_s = now - int(timestamp)
    if age_s > STANDARD_TOLERANCE_S:
        raise SignatureError(f"{STANDARD_TIMESTAMP_HEADER} is too old")
    if age_s < -STANDARD_TOLERANCE_S:
        raise SignatureError(f"{STANDARD_TIMESTAMP_HEADER} is in the future")
    given = [
        _decode_base64(value, STANDARD_SIGNATURE_HEADER)
        for version, _, value in (entry.partition(",") for entry in signature.split())
        if version == "v1"
    ]
    if not given:
        raise SignatureError(f"{STANDARD_SIGNATURE_HEADER} has no v1 signature")
    keys = [key for key in map(_standard_key, source.secrets) if key is not None]
    if not keys:
        raise SignatureError("no usable Standard Webhooks secret configured")
    expected = [_standard_digest(key, msg_id, timestamp, body) for key in keys]
    if not any(hmac.compare_digest(g, e) for g in given for e in expected):
        raise SignatureError("signature does not match")


def _verify_token(
    source: SourceConfig, _body: bytes, headers: Mapping[str, str], _now: float
) -> None:
    header = source.token_header.lower()
    value = _required(headers, header).strip()
    if value[: len(_BEARER)].lower() == _BEARER:
        value = value[len(_BEARER) :].strip()
    given = value.encode()
    if not any(hmac.compare_digest(given, s.encode()) for s in source.secrets):
        raise SignatureError("token does not match")


_CHECKS: dict[str, _Check] = {
    "shopify": _verify_base64_hmac(SHOPIFY_HEADER),
    "woocommerce": _verify_base64_hmac(WOOCOMMERCE_HEADER),
    "standard": _verify_standard,
    "hmac": _verify_generic_hmac,
    "token": _verify_token,
    "strapi": _verify_token,
    "contentful": _verify_token,
    "json": _verify_token,
}


# --- helpers -----------------------------------------------------------------------------


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None or not value.strip():
        raise SignatureError(f"missing {name} header")
    return value


def _decode_base64(value: str, header: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{header} is not base64") from None


def _match_any(given: bytes, expected: Iterable[bytes]) -> None:
    # Compare against every secret, not stopping at the first match, so timing does not
    # reveal which of the rotated secrets the sender used.
    matches = [hmac.compare_digest(given, e) for e in expected]
    if not any(matches):
        raise SignatureError("signature does not match")


_GIL_KEEPING_BYTES = 2047
"""hashlib lets go of the GIL to hash 2,048 bytes or more at once, and HMAC's one-shot
`hmac.digest` always does. Winning it back from the store's writer thread cost a 3.4 KB
webhook's check about 205 us instead of 4 with one busy thread beside it; fed in pieces below
that size, the hash keeps the GIL and costs about 9 us there (bench/hmac_gil.py)."""


@functools.lru_cache(maxsize=64)
def _keyed_sha256(key: bytes) -> hmac.HMAC:
    """HMAC-SHA256 with `key` mixed in once; each check hashes on a copy of it."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    mac = _keyed_sha256(key).copy()
    view = memoryview(message)
    for start in range(0, len(view), _GIL_KEEPING_BYTES):
        mac.update(view[start : start + _GIL_KEEPING_BYTES])
    return mac.digest()


def _standard_key(secret: str) -> bytes | None:
    encoded = secret.removeprefix(_WHSEC_PREFIX)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _standard_digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return _hmac_sha256(key, f"{msg_id}.{timestamp}.".encode() + body)
