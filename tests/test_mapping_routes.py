import json
from pathlib import Path

import pytest

from handlers import REGISTRY
from service.config import RouteConfig
from service.mapping.render import MappingError, evaluate
from service.mapping.routes import (
    HandlerLoadError,
    build_export,
    compile_routes,
    export_name,
    load_handler,
    route_matches,
    should_run,
    topic_matches,
)
from service.model import RawEvent

ROOT = Path(__file__).resolve().parent.parent
PROMO = json.loads((ROOT / "templates" / "product-promo.json").read_text())
LEGACY = json.loads((ROOT / "templates" / "legacy-project.json").read_text())
SCRIPT = "scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org"
IMAGE = "scenes[*].clips[type=image].source_url"


def route(**overrides):
    fields = {
        "name": "new-product",
        "source": "shop",
        "template": "promo",
        "events": ("products/create",),
        "patches": (
            (SCRIPT, "Meet {{ product.title }}, now {{ product.price | money('USD') }}."),
            (IMAGE, "{{ product.image_url }}"),
        ),
    }
    return RouteConfig(**(fields | overrides))


def compile_one(config, template=PROMO):
    compiled, problems = compile_routes([config], {"promo": template})
    return compiled.get(config.name), problems


CONTEXT = {
    "product": {"title": "Oak Lamp", "price": "64.9", "image_url": "https://x/lamp.jpg"},
    "event": {"status": "active"},
}


def test_build_export_patches_a_copy():
    compiled, problems = compile_one(route())
    assert problems == []
    body = build_export(compiled, PROMO, CONTEXT)
    assert body["scenes"][0]["clips"][0]["script"]["org"] == "Meet Oak Lamp, now $64.90."
    assert body["scenes"][0]["clips"][1]["source_url"] == "https://x/lamp.jpg"
    assert PROMO["scenes"][0]["clips"][0]["script"]["org"] == "Hello, This is test video."


def test_build_export_on_a_legacy_project():
    config = route(
        patches=(
            ("scenes[0].AIModel.script", "{{ product.title }}"),
            ("scenes[0].clips[1].detail.url", "{{ product.image_url }}"),
        )
    )
    compiled, problems = compile_one(config, LEGACY)
    assert problems == []
    body = build_export(compiled, LEGACY, CONTEXT)
    assert body["scenes"][0]["AIModel"]["script"] == "Oak Lamp"
    assert body["scenes"][0]["clips"][1]["detail"]["url"] == "https://x/lamp.jpg"


def test_build_export_names_the_failing_patch():
    compiled, _ = compile_one(route())
    context = {"product": {"title": "x", "price": "1", "image_url": None}}
    with pytest.raises(MappingError, match=r'patch "scenes\[\*\].*product\.image_url is null'):
        build_export(compiled, PROMO, context)


def test_build_export_against_a_fetched_template_that_lacks_the_place():
    compiled, problems = compile_one(route(), None)
    assert problems == []
    with pytest.raises(MappingError, match="matches nothing"):
        build_export(compiled, LEGACY, CONTEXT)


def test_every_problem_is_reported_with_its_location():
    config = route(
        when="event.status ==",
        export_name="{{ route }",
        events=("shop/#/x",),
        patches=(
            ("scenes[0].clips[id=nope].script.org", "x"),
            ("scenes[0", "x"),
            (SCRIPT, "{{ product.title | nope }}"),
        ),
    )
    compiled, problems = compile_routes([config], {"promo": PROMO})
    assert compiled == {}
    found = {p.location: p.message for p in problems}
    assert set(found) == {
        "routes[0].when",
        "routes[0].export_name",
        "routes[0].events[0]",
        'routes[0].patches."scenes[0].clips[id=nope].script.org"',
        'routes[0].patches."scenes[0"',
        f'routes[0].patches."{SCRIPT}"',
    }
    assert (
        "matches nothing in template 'promo'"
        in found['routes[0].patches."scenes[0].clips[id=nope].script.org"']
    )
    assert (
        "'[id=nope]' matches nothing inside 'scenes[0].clips'"
        in found['routes[0].patches."scenes[0].clips[id=nope].script.org"']
    )
    assert found['routes[0].patches."scenes[0"'].startswith("selector: expected ']'")
    assert "No filter named 'nope'" in found[f'routes[0].patches."{SCRIPT}"']
    assert "syntax error at line 1" in found["routes[0].when"]


def test_template_not_available_offline_checks_syntax_only():
    config = route(patches=(("scenes[0].AIModel.script", "{{ product.title }}"),))
    compiled, problems = compile_routes([config], {"promo": None})
    assert problems == []
    assert "new-product" in compiled
    _, problems = compile_routes([config], {"promo": PROMO})
    assert [p.location for p in problems] == ['routes[0].patches."scenes[0].AIModel.script"']


def test_good_routes_compile_even_when_another_is_bad():
    good, bad = route(), route(name="bad", when="{{")
    compiled, problems = compile_routes([good, bad], {"promo": PROMO})
    assert set(compiled) == {"new-product"}
    assert [p.location for p in problems] == ["routes[1].when"]


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("shop/products/new", "shop/products/new", True),
        ("shop/products/new", "shop/products/old", False),
        ("shop/+/new", "shop/products/new", True),
        ("shop/+/new", "shop/a/b/new", False),
        ("shop/+", "shop/", True),
        ("shop/#", "shop", True),
        ("shop/#", "shop/a/b/c", True),
        ("#", "anything/at/all", True),
        ("+/+", "a/b", True),
        ("+/+", "a/b/c", False),
        ("+", "/a", False),
        ("shop/products", "shop/products/new", False),
        ("shop/products/new/x", "shop/products/new", False),
        ("#", "$SYS/broker/load", False),
        ("+/broker/load", "$SYS/broker/load", False),
        ("$SYS/#", "$SYS/broker/load", True),
    ],
)
def test_topic_matches(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


def test_route_matches_source_and_event_types():
    compiled, _ = compile_one(route(events=("products/create", "products/*", "shop/+/new")))
    assert route_matches(compiled, "shop", "products/create")
    assert route_matches(compiled, "shop", "products/update")
    assert route_matches(compiled, "shop", "shop/lamps/new")
    assert not route_matches(compiled, "shop", "orders/create")
    assert not route_matches(compiled, "other", "products/create")
    everything, _ = compile_one(route(events=()))
    assert route_matches(everything, "shop", "whatever")
    star, _ = compile_one(route(events=("*",)))
    assert route_matches(star, "shop", "ContentManagement.Entry.publish")
    exact, _ = compile_one(route(events=("product.created",)))
    assert not route_matches(exact, "shop", "productXcreated")


def test_when_condition():
    active, _ = compile_one(route(when="event.status == 'active'"))
    assert should_run(active, CONTEXT)
    assert not should_run(active, {**CONTEXT, "event": {"status": "draft"}})
    unconditional, _ = compile_one(route())
    assert should_run(unconditional, {})


def test_export_name_is_rendered_and_suffixed_with_the_job_id():
    plain, _ = compile_one(route())
    context = {"route": "new-product", "event_id": "evt-1", "source": "shop"}
    assert export_name(plain, context, "job_abc") == "new-product evt-1 #job_abc"
    assert export_name(plain, {"event_id": None}, "job_abc") == "new-product #job_abc"
    custom, _ = compile_one(route(export_name="{{ product.title }}\n  promo " + "x" * 200))
    name = export_name(custom, CONTEXT, "job_abc")
    assert name.startswith("Oak Lamp promo xxx")
    assert name.endswith(" #job_abc")
    assert "\n" not in name
    assert len(name) == 100 + len(" #job_abc")


def test_load_handler_forms(tmp_path, monkeypatch):
    (tmp_path / "my_shop_handlers.py").write_text(
        "from handlers.generic import handle\nNOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_handler_mod.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_handler("my_shop_handlers:handle") is REGISTRY["json"]
    assert load_handler("my_shop_handlers.handle") is REGISTRY["json"]
    raw = RawEvent(source="s", payload={"id": 7}, headers={})
    assert load_handler("handlers.shopify:handle") is REGISTRY["shopify"]
    assert load_handler("my_shop_handlers:handle")(raw).event_id == "7"
    with pytest.raises(HandlerLoadError, match="has no 'nope'"):
        load_handler("my_shop_handlers:nope")
    with pytest.raises(HandlerLoadError, match="is not a function"):
        load_handler("my_shop_handlers:NOT_CALLABLE")
    with pytest.raises(ImportError, match="no module named 'no_such_module_xyz'"):
        load_handler("no_such_module_xyz:handle")
    with pytest.raises(HandlerLoadError, match="not of the form"):
        load_handler("justaname")
    with pytest.raises(HandlerLoadError, match="importing 'broken_handler_mod' failed"):
        load_handler("broken_handler_mod:handle")


def test_a_coalesce_key_is_compiled_with_the_route_and_a_broken_one_is_a_problem():
    compiled, problems = compile_one(route(coalesce_key="{{ product.title }}", coalesce_seconds=60))
    assert problems == []
    assert compiled.coalesce_key is not None
    assert evaluate(compiled.coalesce_key, CONTEXT) == "Oak Lamp"
    compiled, problems = compile_one(route(coalesce_key="{{ product.title ", coalesce_seconds=60))
    assert compiled is None
    assert [p.location for p in problems] == ["routes[0].coalesce_key"]
