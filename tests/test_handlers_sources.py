import json
from pathlib import Path

import pytest

from handlers import REGISTRY, HandlerError
from handlers.base import ARTICLE_FIELDS, PRODUCT_FIELDS
from service.config import SOURCE_KINDS
from service.mapping.render import compile_expression, evaluate
from service.model import RawEvent

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def sample(name, kind, topic=None):
    payload = json.loads((EXAMPLES / f"{name}.json").read_text())
    headers_file = EXAMPLES / f"{name}.headers.json"
    headers = {}
    if headers_file.exists():
        headers = {k.lower(): v for k, v in json.loads(headers_file.read_text()).items()}
    raw = RawEvent(source=f"my-{kind}", payload=payload, headers=headers, topic=topic)
    return REGISTRY[kind](raw)


def test_registry_covers_every_source_kind():
    assert set(REGISTRY) == set(SOURCE_KINDS)


def test_shopify_product_create():
    handled = sample("shopify-product-create", "shopify")
    assert handled.event_id == "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"
    assert handled.event_type == "products/create"
    product = handled.context["product"]
    assert product["title"] == "Ceramic Pour-Over Coffee Set"
    assert product["description"].startswith("<p>Brew a <strong>better cup</strong>")
    assert product["price"] == "49.00"
    assert product["currency"] is None
    assert product["image_url"].startswith("https://cdn.shopify.com/")
    assert product["url"] == (
        "https://northfield-ceramics.myshopify.com/products/ceramic-pour-over-coffee-set"
    )
    assert product["vendor"] == "Northfield Ceramics"
    assert product["handle"] == "ceramic-pour-over-coffee-set"
    assert handled.context["source"] == "my-shopify"
    assert handled.context["event"]["id"] == 8712340521234


def test_shopify_fallbacks_event_id_and_currency():
    raw = RawEvent(
        source="s",
        payload={"id": 1, "images": [{"src": "https://x/1.jpg"}]},
        headers={"x-shopify-event-id": "ev-9", "x-shopify-shop-currency": "EUR"},
    )
    handled = REGISTRY["shopify"](raw)
    assert handled.event_id == "ev-9"
    assert handled.context["product"]["currency"] == "EUR"
    assert handled.context["product"]["image_url"] == "https://x/1.jpg"
    assert handled.context["product"]["title"] is None
    assert handled.context["product"]["url"] is None


def test_credentials_never_reach_the_context():
    headers = sample("shopify-product-create", "shopify").context["headers"]
    assert "x-shopify-hmac-sha256" not in headers
    assert headers["x-shopify-topic"] == "products/create"
    raw = RawEvent(source="t", payload={}, headers={"authorization": "Bearer s3cret", "x-a": "1"})
    assert REGISTRY["token"](raw).context["headers"] == {"x-a": "1"}
    std = sample("standard-webhook", "standard").context["headers"]
    assert "webhook-signature" not in std
    assert std["webhook-id"] == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"


def test_woocommerce_product_created():
    handled = sample("woocommerce-product-created", "woocommerce")
    assert handled.event_id == "3f7c2a9e8d5b4c1f0a6e9d2b7c4a1f80"
    assert handled.event_type == "product.created"
    product = handled.context["product"]
    assert product["title"] == "Linen Apron"
    assert product["price"] == "34.50"
    assert (
        product["image_url"]
        == "https://shop.example.com/wp-content/uploads/2024/04/linen-apron.jpg"
    )
    assert product["url"] == "https://shop.example.com/product/linen-apron/"
    assert product["handle"] == "linen-apron"
    assert product["description"].startswith("<p>Stonewashed")


def test_strapi_entry_publish():
    handled = sample("strapi-entry-publish", "strapi")
    assert handled.event_type == "entry.publish"
    assert handled.event_id == (
        "api::article.article:f8k2mq9x0c1vbn3l5zr7wt4y@2024-05-06T08:30:12.455Z:entry.publish"
    )
    article = handled.context["article"]
    assert article["title"] == "Five ways to brew better coffee at home"
    assert article["body"].startswith("<p>Start with <em>fresh</em>")
    assert article["image_url"] == "https://media.example.com/uploads/brewing_5d1e2f.jpg"
    assert article["url"] == "https://blog.example.com/five-ways-to-brew-better-coffee"
    assert handled.context["product"]["title"] == article["title"]


def test_strapi_blocks_and_v4_media():
    raw = RawEvent(
        source="s",
        payload={
            "event": "entry.update",
            "model": "post",
            "entry": {
                "id": 3,
                "updatedAt": "2024-01-01T00:00:00Z",
                "title": "T",
                "content": [
                    {
                        "type": "paragraph",
                        "children": [
                            {"type": "text", "text": "One "},
                            {"type": "text", "text": "two."},
                        ],
                    },
                    {"type": "paragraph", "children": [{"type": "text", "text": "Three."}]},
                ],
                "image": {"data": {"id": 1, "attributes": {"url": "https://m/x.png"}}},
            },
        },
        headers={},
    )
    handled = REGISTRY["strapi"](raw)
    assert handled.event_id == "post:3@2024-01-01T00:00:00Z:entry.update"
    assert handled.context["article"]["body"] == "One two.\nThree."
    assert handled.context["article"]["image_url"] == "https://m/x.png"


def test_contentful_entry_publish():
    handled = sample("contentful-entry-publish", "contentful")
    assert handled.event_type == "ContentManagement.Entry.publish"
    assert handled.event_id == "5KsDBWseXY6QegucYAoacS:7:publish"
    article = handled.context["article"]
    assert article["title"] == "Walnut Serving Board"
    assert (
        article["body"]
        == "Cut from a single slab of American walnut.\nFinished with food-safe oil."
    )
    product = handled.context["product"]
    assert product["price"] == 89
    assert product["currency"] == "EUR"
    assert product["image_url"] == "https://images.ctfassets.net/yadj1kx9rmg0/walnut-board.jpg"
    assert product["handle"] == "walnut-serving-board"


def test_contentful_asset_event_has_its_file_url():
    raw = RawEvent(
        source="c",
        payload={
            "sys": {"type": "Asset", "id": "a1", "revision": 2},
            "fields": {
                "title": {"de-DE": "Bild"},
                "file": {"de-DE": {"url": "//images.ctfassets.net/s/a1/x.jpg"}},
            },
        },
        headers={"x-contentful-topic": "ContentManagement.Asset.publish"},
    )
    handled = REGISTRY["contentful"](raw)
    assert handled.event_id == "a1:2:publish"
    assert handled.context["product"]["image_url"] == "https://images.ctfassets.net/s/a1/x.jpg"
    assert handled.context["article"]["title"] == "Bild"


def test_standard_webhook():
    handled = sample("standard-webhook", "standard")
    assert handled.event_id == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    assert handled.event_type == "product.created"
    product = handled.context["product"]
    assert product["title"] == "Trail Running Vest"
    assert product["price"] == 119.0
    assert product["currency"] == "USD"
    assert product["vendor"] == "Ridgeline"
    assert product["image_url"] == "https://assets.example.com/products/trail-vest.png"


def test_mqtt_product():
    handled = sample("mqtt-product", "mqtt", topic="shop/products/new")
    assert handled.event_type == "shop/products/new"
    assert handled.event_id == "evt-20240509-0001"
    product = handled.context["product"]
    assert product["title"] == "Oak Desk Lamp"
    assert product["currency"] == "CHF"
    assert product["image_url"] == "https://cdn.example.ch/lamps/oak-desk-lamp.jpg"
    assert product["handle"] == "oak-desk-lamp"


@pytest.mark.parametrize("kind", ["json", "hmac", "token", "mqtt"])
def test_generic_json_accepts_any_json(kind):
    handled = REGISTRY[kind](RawEvent(source="g", payload=[1, 2], headers={}, topic="t/1"))
    assert handled.event_id is None
    assert handled.context["event"] == [1, 2]
    assert handled.context["product"]["title"] is None
    typed = REGISTRY["json"](RawEvent(source="g", payload={"type": "x.y", "id": 5}, headers={}))
    assert (typed.event_id, typed.event_type) == ("5", "x.y")


@pytest.mark.parametrize("kind", ["shopify", "woocommerce", "strapi", "contentful", "standard"])
@pytest.mark.parametrize("payload", [None, [], "text", 3])
def test_unusable_payloads_raise_handler_error(kind, payload):
    with pytest.raises(HandlerError, match="must be a JSON object"):
        REGISTRY[kind](RawEvent(source="s", payload=payload, headers={}))


@pytest.mark.parametrize("kind", sorted(SOURCE_KINDS))
def test_empty_object_never_raises_and_has_every_field(kind):
    handled = REGISTRY[kind](RawEvent(source="s", payload={}, headers={}))
    assert handled.event_id is None
    assert set(handled.context["product"]) == set(PRODUCT_FIELDS)
    assert set(handled.context["article"]) == set(ARTICLE_FIELDS)
    assert all(v is None for v in handled.context["product"].values())


def test_sample_renders_through_the_mapping():
    context = sample("shopify-product-create", "shopify").context
    script = compile_expression(
        "{{ product.title }}: {{ product.description | strip_html | truncate_words(8) }} "
        "From {{ product.price | money(product.currency or 'USD') }}."
    )
    assert evaluate(script, context) == (
        "Ceramic Pour-Over Coffee Set: Brew a better cup every morning. "
        "Hand-glazed stoneware… From $49.00."
    )
