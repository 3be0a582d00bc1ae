"""Signature checks per source kind: known answers, tampering, rotation, replay windows."""

import base64
import hashlib
import hmac

import pytest

from service.config import SourceConfig
from service.ingress import signatures
from service.ingress.signatures import (
    SignatureError,
    sign_standard,
    signature_headers,
    verify,
)

# The Standard Webhooks specification's known-answer vector.
STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STD_TS = 1614265330
STD_BODY = b'{"test": 2432232314}'
STD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# GitHub's documented example for X-Hub-Signature-256.
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

BODY = b'{"id": 7, "title": "Red shoe"}'


def b64_hmac(secret: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def reason_of(source: SourceConfig, body: bytes, headers: dict[str, str], now: float = 0) -> str:
    with pytest.raises(SignatureError) as caught:
        verify(source, body, headers, now)
    for secret in source.secrets:
        assert secret not in caught.value.reason
    return caught.value.reason


# --- Standard Webhooks ---------------------------------------------------------------------

STANDARD = SourceConfig(name="std", kind="standard", secrets=(STD_SECRET,))


def std_headers(signature: str = STD_SIGNATURE, ts: int = STD_TS) -> dict[str, str]:
    return {"webhook-id": STD_ID, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_standard_sign_matches_the_spec_vector():
    assert sign_standard(STD_SECRET, STD_ID, STD_TS, STD_BODY) == STD_SIGNATURE


def test_standard_spec_vector_verifies():
    verify(STANDARD, STD_BODY, std_headers(), STD_TS)


def test_standard_secret_without_prefix_is_raw_base64():
    source = SourceConfig(name="std", kind="standard", secrets=(STD_SECRET.removeprefix("whsec_"),))
    verify(source, STD_BODY, std_headers(), STD_TS)


def test_standard_tampered_body_is_rejected():
    assert reason_of(STANDARD, b'{"test": 2432232315}', std_headers(), STD_TS) == (
        "signature does not match"
    )


def test_standard_wrong_secret_is_rejected():
    other = SourceConfig(name="std", kind="standard", secrets=("whsec_" + "A" * 32,))
    assert reason_of(other, STD_BODY, std_headers(), STD_TS) == "signature does not match"


def test_standard_signature_is_bound_to_id_and_timestamp():
    headers = std_headers(ts=STD_TS + 1)
    assert reason_of(STANDARD, STD_BODY, headers, STD_TS) == "signature does not match"
    headers = std_headers() | {"webhook-id": "msg_other"}
    assert reason_of(STANDARD, STD_BODY, headers, STD_TS) == "signature does not match"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_missing_header_is_named(missing):
    headers = std_headers()
    del headers[missing]
    assert reason_of(STANDARD, STD_BODY, headers, STD_TS) == f"missing {missing} header"


def test_standard_stale_and_future_timestamps_are_rejected_even_when_signed():
    assert reason_of(STANDARD, STD_BODY, std_headers(), STD_TS + 301) == (
        "webhook-timestamp is too old"
    )
    assert reason_of(STANDARD, STD_BODY, std_headers(), STD_TS - 301) == (
        "webhook-timestamp is in the future"
    )
    verify(STANDARD, STD_BODY, std_headers(), STD_TS + 300)
    verify(STANDARD, STD_BODY, std_headers(), STD_TS - 300)


def test_standard_timestamp_must_be_unix_seconds():
    headers = std_headers() | {"webhook-timestamp": "2021-02-26T15:02:10Z"}
    assert reason_of(STANDARD, STD_BODY, headers, STD_TS) == (
        "webhook-timestamp is not unix seconds"
    )


def test_standard_one_valid_entry_among_several_is_enough():
    forged = "v1," + base64.b64encode(b"x" * 32).decode()
    signature = f"v1a,c29tZXRoaW5n {forged} {STD_SIGNATURE}"
    verify(STANDARD, STD_BODY, std_headers(signature), STD_TS)


def test_standard_without_any_v1_entry_is_malformed():
    reason = reason_of(STANDARD, STD_BODY, std_headers("v1a,c29tZXRoaW5n"), STD_TS)
    assert reason == "webhook-signature has no v1 signature"


def test_standard_entry_that_is_not_base64_is_malformed():
    reason = reason_of(STANDARD, STD_BODY, std_headers("v1,not*base64"), STD_TS)
    assert reason == "webhook-signature is not base64"


def test_standard_rotated_secrets_any_one_matches():
    rotated = SourceConfig(name="std", kind="standard", secrets=("whsec_" + "A" * 32, STD_SECRET))
    verify(rotated, STD_BODY, std_headers(), STD_TS)


def test_sign_standard_refuses_a_secret_that_is_not_base64():
    with pytest.raises(ValueError, match="whsec_"):
        sign_standard("whsec_not base64!", STD_ID, STD_TS, STD_BODY)


# --- Shopify and WooCommerce (base64 HMAC of the body) ------------------------------------

BASE64_KINDS = [("shopify", "x-shopify-hmac-sha256"), ("woocommerce", "x-wc-webhook-signature")]


@pytest.mark.parametrize(("kind", "header"), BASE64_KINDS)
def test_base64_hmac_known_good_is_accepted(kind, header):
    source = SourceConfig(name=kind, kind=kind, secrets=("s3cret-one",))
    verify(source, BODY, {header: b64_hmac("s3cret-one", BODY)}, 0)


@pytest.mark.parametrize(("kind", "header"), BASE64_KINDS)
def test_base64_hmac_rejections_have_distinct_reasons(kind, header):
    source = SourceConfig(name=kind, kind=kind, secrets=("s3cret-one",))
    good = b64_hmac("s3cret-one", BODY)
    assert reason_of(source, BODY + b" ", {header: good}) == "signature does not match"
    assert reason_of(source, BODY, {header: b64_hmac("wrong", BODY)}) == "signature does not match"
    assert reason_of(source, BODY, {}) == f"missing {header} header"
    assert reason_of(source, BODY, {header: "  "}) == f"missing {header} header"
    assert reason_of(source, BODY, {header: "%%%"}) == f"{header} is not base64"


@pytest.mark.parametrize(("kind", "header"), BASE64_KINDS)
def test_base64_hmac_rotation_accepts_old_and_new(kind, header):
    source = SourceConfig(name=kind, kind=kind, secrets=("new-secret", "old-secret"))
    verify(source, BODY, {header: b64_hmac("old-secret", BODY)}, 0)
    verify(source, BODY, {header: b64_hmac("new-secret", BODY)}, 0)


def test_shopify_does_not_accept_the_woocommerce_header():
    source = SourceConfig(name="shop", kind="shopify", secrets=("s3cret-one",))
    headers = {"x-wc-webhook-signature": b64_hmac("s3cret-one", BODY)}
    assert reason_of(source, BODY, headers) == "missing x-shopify-hmac-sha256 header"


# --- generic HMAC ---------------------------------------------------------------------------

GITHUB = SourceConfig(
    name="gh",
    kind="hmac",
    secrets=(GH_SECRET,),
    signature_header="X-Hub-Signature-256",
    signature_prefix="sha256=",
)


def test_hmac_hex_with_prefix_matches_githubs_example():
    verify(GITHUB, GH_BODY, {"x-hub-signature-256": GH_SIGNATURE}, 0)


def test_hmac_hex_is_case_insensitive():
    verify(GITHUB, GH_BODY, {"x-hub-signature-256": "sha256=" + GH_SIGNATURE[7:].upper()}, 0)


def test_hmac_rejections_have_distinct_reasons():
    header = "x-hub-signature-256"
    assert reason_of(GITHUB, b"Hello, World?", {header: GH_SIGNATURE}) == "signature does not match"
    assert reason_of(GITHUB, GH_BODY, {}) == f"missing {header} header"
    assert reason_of(GITHUB, GH_BODY, {header: GH_SIGNATURE[7:]}) == (
        f"{header} does not start with 'sha256='"
    )
    assert reason_of(GITHUB, GH_BODY, {header: "sha256=zz"}) == f"{header} is not hex"


def test_hmac_base64_without_prefix():
    source = SourceConfig(
        name="b",
        kind="hmac",
        secrets=("old", "new"),
        signature_header="X-Signature",
        signature_encoding="base64",
    )
    verify(source, BODY, {"x-signature": b64_hmac("new", BODY)}, 0)
    assert reason_of(source, BODY, {"x-signature": b64_hmac("other", BODY)}) == (
        "signature does not match"
    )


# --- tokens ---------------------------------------------------------------------------------

TOKEN = SourceConfig(name="t", kind="token", secrets=("tok-old", "tok-new"))


@pytest.mark.parametrize("value", ["tok-new", "Bearer tok-new", "bearer tok-old", " tok-old "])
def test_token_raw_or_bearer_is_accepted(value):
    verify(TOKEN, BODY, {"authorization": value}, 0)


def test_token_rejections_have_distinct_reasons():
    assert reason_of(TOKEN, BODY, {"authorization": "Bearer tok-newer"}) == "token does not match"
    assert reason_of(TOKEN, BODY, {"authorization": "Bearer "}) == "token does not match"
    assert reason_of(TOKEN, BODY, {}) == "missing authorization header"


def test_token_in_a_custom_header():
    source = SourceConfig(name="t", kind="token", secrets=("c7-9q",), token_header="X-Api-Token")
    verify(source, BODY, {"x-api-token": "c7-9q"}, 0)
    assert reason_of(source, BODY, {"authorization": "c7-9q"}) == "missing x-api-token header"


@pytest.mark.parametrize("kind", ["strapi", "contentful", "json", "mqtt"])
def test_unsigned_kinds_without_secrets_are_not_checked(kind):
    verify(SourceConfig(name=kind, kind=kind), BODY, {}, 0)


@pytest.mark.parametrize("kind", ["strapi", "contentful", "json"])
def test_unsigned_kinds_with_secrets_check_a_token(kind):
    source = SourceConfig(name=kind, kind=kind, secrets=("shared-token",))
    verify(source, BODY, {"authorization": "Bearer shared-token"}, 0)
    assert reason_of(source, BODY, {}) == "missing authorization header"
    assert reason_of(source, BODY, {"authorization": "nope"}) == "token does not match"


# --- failing closed -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shopify", "woocommerce", "standard", "hmac", "token"])
def test_a_signed_kind_without_secrets_rejects_everything(kind):
    source = SourceConfig(name=kind, kind=kind, signature_header="x-sig")
    assert reason_of(source, BODY, {}) == "no secret configured for this source"


def test_an_unknown_kind_rejects_everything():
    assert reason_of(SourceConfig(name="x", kind="carrier-pigeon"), BODY, {}) == (
        "source kind 'carrier-pigeon' cannot be verified"
    )


def test_signature_headers_cover_what_carries_a_secret():
    assert "authorization" in signature_headers(TOKEN)
    assert "x-hub-signature-256" in signature_headers(GITHUB)
    names = signature_headers(STANDARD)
    assert "webhook-signature" in names
    assert "webhook-id" not in names
    assert "webhook-timestamp" not in names


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 3453, 4094, 4095, 100_000])
def test_the_hmac_fed_in_pieces_is_the_hmac_of_the_whole_body(size):
    """The check hashes in pieces under 2 KB so the hash keeps the GIL; the digest must be
    the one of the whole body, at every piece boundary."""
    body = bytes(n % 251 for n in range(size))
    key = b"whsec-or-shop-secret"
    assert signatures._hmac_sha256(key, body) == hmac.digest(key, body, "sha256")
