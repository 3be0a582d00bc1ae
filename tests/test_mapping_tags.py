"""Clips by editor tag, scripts by index, and `updates` keys: pure, no loop."""

import pytest

from service.config import RouteConfig
from service.mapping.render import MappingError
from service.mapping.routes import build_updates, compile_routes
from service.mapping.selectors import apply_patches, explain_no_match, find, parse_selector
from service.mapping.updates import (
    Layout,
    UpdateKeyError,
    apply_updates,
    duplicate_keys,
    layout_of,
    layout_problem,
    parse_update_key,
)


def text_clip(tag: str | None, text: str) -> dict:
    clip = {"type": "textImage", "text": text, "fontSize": 48, "left": 0, "top": 0}
    if tag is not None:
        clip["tag"] = tag
    return clip


SAVED = {
    "name": "Parrot",
    "orientation": "landscape",
    "scenes": [
        {
            "sceneIdx": 0,
            "clips": [
                {"type": "aiModel", "model": {"ai_name": "M1", "emotion": "C1"}},
                {"type": "image", "tag": "parrot-image", "source_url": "https://cdn/p.png"},
                text_clip("parrot-text", "A parrot"),
                text_clip("title", "Title one"),
            ],
            "scripts": [{"org": "Hello", "isTTS": False, "tts": None}],
        },
        {
            "sceneIdx": 1,
            "clips": [text_clip("title", "Title two"), text_clip(None, "untagged")],
            "scripts": [{"org": "Line A"}, {"org": "Line B"}],
        },
    ],
}


# --- selectors by tag and script index ----------------------------------------------------


def test_a_clip_by_its_editor_tag():
    selector = parse_selector("scenes[0].clips[tag=parrot-image].source_url")
    assert find(selector, SAVED) == [("scenes", 0, "clips", 1, "source_url")]


def test_every_clip_with_a_tag_across_scenes():
    selector = parse_selector("scenes[*].clips[tag=title].text")
    assert find(selector, SAVED) == [
        ("scenes", 0, "clips", 3, "text"),
        ("scenes", 1, "clips", 0, "text"),
    ]
    patched = apply_patches(SAVED, [(selector, "New title")])
    assert [c.get("text") for c in patched["scenes"][0]["clips"]] == [
        None,
        None,
        "A parrot",
        "New title",
    ]
    assert [c["text"] for c in patched["scenes"][1]["clips"]] == ["New title", "untagged"]
    assert SAVED["scenes"][0]["clips"][3]["text"] == "Title one"


def test_a_script_by_index():
    selector = parse_selector("scenes[1].scripts[1].org")
    patched = apply_patches(SAVED, [(selector, "Line B, changed")])
    assert [s["org"] for s in patched["scenes"][1]["scripts"]] == ["Line A", "Line B, changed"]
    assert patched["scenes"][0] == SAVED["scenes"][0]


def test_a_missing_tag_names_the_tags_that_exist():
    selector = parse_selector("scenes[0].clips[tag=parot-image].source_url")
    assert find(selector, SAVED) == []
    assert explain_no_match(selector, SAVED) == (
        "'[tag=parot-image]' matches nothing inside 'scenes[0].clips' "
        "(tag there: parrot-image, parrot-text, title)"
    )


def test_a_missing_tag_across_scenes_lists_each_tag_once():
    selector = parse_selector("scenes[*].clips[tag=subtitle].text")
    assert explain_no_match(selector, SAVED).endswith(
        "(tag there: parrot-image, parrot-text, title)"
    )


def test_a_field_no_item_has_is_said_so():
    selector = parse_selector("scenes[1].scripts[voice=x].org")
    assert explain_no_match(selector, SAVED).endswith("(no item there has a 'voice')")


def test_a_script_index_past_the_end_says_how_many_there_are():
    selector = parse_selector("scenes[1].scripts[2].org")
    assert explain_no_match(selector, SAVED) == (
        "'[2]' matches nothing inside 'scenes[1].scripts' (it has 2 items)"
    )


# --- updates keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "index"),
    [
        ("title", "title", 0),
        ("title_2", "title", 2),
        ("subtitles_1", "subtitles", 1),
        ("scripts", "scripts", 0),
        ("scripts_3", "scripts", 3),
    ],
)
def test_update_keys_of_the_page(text, kind, index):
    key = parse_update_key(text)
    assert (key.kind, key.index) == (kind, index)


@pytest.mark.parametrize("text", ["subtitle", "Title", "title_", "title_x", "image_1", "title-2"])
def test_other_update_keys_are_refused_with_the_allowed_ones(text):
    with pytest.raises(UpdateKeyError, match="use title, subtitles or scripts"):
        parse_update_key(text)


def test_two_keys_for_one_clip_are_found():
    keys = [parse_update_key(k) for k in ("title", "title_1", "title_0")]
    assert [(a.text, b.text) for a, b in duplicate_keys(keys)] == [("title", "title_0")]


def test_layout_counts_tags_in_video_order_and_scenes():
    assert layout_of(SAVED) == Layout({"parrot-image": 1, "parrot-text": 1, "title": 2}, 2)


def test_layout_problems_name_what_exists():
    layout = layout_of(SAVED)
    assert layout_problem(parse_update_key("title_1"), layout) is None
    assert layout_problem(parse_update_key("scripts_1"), layout) is None
    assert layout_problem(parse_update_key("title_2"), layout) == (
        "'title_2' addresses clip 3 tagged 'title', but the template has 2; "
        "tags there: parrot-image (1), parrot-text (1), title (2)"
    )
    assert layout_problem(parse_update_key("subtitles"), layout) == (
        "'subtitles': no clip is tagged 'subtitles'; "
        "tags there: parrot-image (1), parrot-text (1), title (2)"
    )
    assert layout_problem(parse_update_key("scripts_2"), layout) == (
        "'scripts_2' addresses scene 3, but the template has 2"
    )


def test_apply_updates_changes_only_what_the_keys_address():
    changed = apply_updates(SAVED, {"title_1": "Second", "scripts": "Hi there"})
    assert changed["scenes"][0]["clips"] == SAVED["scenes"][0]["clips"]
    assert changed["scenes"][1]["clips"][0]["text"] == "Second"
    assert changed["scenes"][1]["clips"][1] == SAVED["scenes"][1]["clips"][1]
    assert changed["scenes"][0]["scripts"][0]["org"] == "Hi there"
    assert changed["scenes"][1]["scripts"] == SAVED["scenes"][1]["scripts"]
    with pytest.raises(UpdateKeyError, match="title_5"):
        apply_updates(SAVED, {"title_5": "x"})


# --- a route's patches as `updates` -------------------------------------------------------


def updates_route(patches: tuple[tuple[str, str], ...]):

    config = RouteConfig(name="r", source="s", template="t", patches=patches)
    routes, problems = compile_routes([config], {"t": None})
    assert problems == []
    return routes["r"]


def test_updates_are_the_rendered_patch_values_as_text():

    route = updates_route((("title", "{{ product.title }}"), ("scripts_1", "{{ product.price }}")))
    context = {"product": {"title": "Lamp", "price": 19.5}}
    assert build_updates(route, context) == {"title": "Lamp", "scripts_1": "19.5"}


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("{{ product.tags }}", "the value is list, not text"),
        ("{{ product.active }}", "the value is bool, not text"),
        ("{{ product.missing }}", "product.missing is undefined"),
    ],
)
def test_an_update_that_is_not_text_is_a_mapping_error(expression, reason):

    route = updates_route((("title", expression),))
    context = {"product": {"tags": ["a"], "active": True}}
    with pytest.raises(MappingError, match=reason) as info:
        build_updates(route, context)
    assert str(info.value).startswith('update "title": ')
