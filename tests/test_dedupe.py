import jmespath
import pytest

from service.config import SourceConfig
from service.ingress.dedupe import (
    DedupeKeyError,
    body_key,
    dedupe_key,
    event_id_for,
    search_dedupe_expression,
)


def key(kind, *, spec=None, payload=None, headers=None, body=b"{}", topic=None, handler_id=None):
    source = SourceConfig(name="s", kind=kind, dedupe_key=spec)
    return dedupe_key(
        source,
        payload=payload or {},
        headers=headers or {},
        body=body,
        topic=topic,
        handler_event_id=handler_id,
    )


@pytest.mark.parametrize(
    ("kind", "header"),
    [
        ("shopify", "x-shopify-webhook-id"),
        ("woocommerce", "x-wc-webhook-delivery-id"),
        ("standard", "webhook-id"),
    ],
)
def test_a_senders_delivery_id_is_the_key(kind, header):
    assert key(kind, headers={header: "d-1"}, body=b"a") == key(
        kind, headers={header: "d-1"}, body=b"b"
    )
    assert key(kind, headers={header: "d-1"}) != key(kind, headers={header: "d-2"})


def test_cms_entries_dedupe_on_the_handlers_entry_and_version():
    assert key("strapi", handler_id="e1@v2", body=b"a") == "e:e1@v2"
    assert key("contentful", handler_id="e1:3", body=b"b") == "e:e1:3"


def test_configured_expression_header_and_prefixed_header():
    assert key("json", spec="order.id", payload={"order": {"id": 42}}) == "j:42"
    assert key("json", spec="X-Request-Id", headers={"x-request-id": "r9"}) == "h:r9"
    assert key("json", spec="header:X-Trace", headers={"x-trace": "t1"}) == "h:t1"


def test_configured_key_overrides_a_kinds_delivery_id():
    headers = {"x-shopify-webhook-id": "d-1", "x-request-id": "mine"}
    assert key("shopify", spec="X-Request-Id", headers=headers) == "h:mine"


def test_a_configured_key_that_finds_nothing_is_an_error_not_a_guess():
    with pytest.raises(DedupeKeyError, match="found nothing"):
        key("json", spec="order.id", payload={"order": {}})
    with pytest.raises(DedupeKeyError, match="'x-request-id' is missing"):
        key("json", spec="X-Request-Id")
    with pytest.raises(DedupeKeyError, match="invalid JMESPath"):
        key("json", spec="items[?")


def test_the_last_resort_is_the_bytes_and_the_topic():
    assert key("json", body=b"x") == body_key(b"x")
    assert key("mqtt", body=b"x", topic="a/b") == body_key(b"x", "a/b")
    assert body_key(b"x", "a/b") != body_key(b"x", "a/c") != body_key(b"x")


def test_event_id_prefers_the_senders_own():
    assert event_id_for("evt-1", "h:whatever") == "evt-1"
    assert event_id_for(None, "b:abc").startswith("evt_")
    assert event_id_for(None, "b:abc") == event_id_for(None, "b:abc")


PAYLOADS = [
    {"id": "e1"},
    {"id": 0},
    {"id": False},
    {"id": None},
    {"id": ""},
    {"id": {"nested": 1}},
    {"id": [1, 2]},
    {"ID": "upper only"},
    {"_id": "x", "id2": "y"},
    {},
    [{"id": "in a list"}],
    "id",
    42,
    None,
    True,
]


@pytest.mark.parametrize("expression", ["id", "ID", "_id", "id2", "true", "null", "order_id"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_bare_field_name_finds_what_jmespath_finds(expression, payload):
    assert search_dedupe_expression(expression, payload) == jmespath.search(expression, payload)


@pytest.mark.parametrize("expression", ["order.id", "items[0].sku", '"id"', "id || ID"])
def test_other_expressions_are_still_jmespaths(expression):
    payload = {"order": {"id": 7}, "items": [{"sku": "A"}], "id": "x", "ID": "y"}
    assert search_dedupe_expression(expression, payload) == jmespath.search(expression, payload)
