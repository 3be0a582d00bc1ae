import copy
import json
from pathlib import Path

import pytest

from service.mapping.selectors import (
    All,
    Filter,
    Index,
    Key,
    SelectorError,
    SelectorMatchError,
    apply_patches,
    explain_no_match,
    find,
    parse_selector,
)

ROOT = Path(__file__).resolve().parent.parent
PROMO = json.loads((ROOT / "templates" / "product-promo.json").read_text())
LEGACY = json.loads((ROOT / "templates" / "legacy-project.json").read_text())


def paths(text, document=PROMO):
    return find(parse_selector(text), document)


def test_parse_steps():
    selector = parse_selector("scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org")
    assert selector.steps == (
        Key("scenes"),
        Index(0),
        Key("clips"),
        Filter("id", "aiModel-1h4ij5h8e87"),
        Key("script"),
        Key("org"),
    )
    assert parse_selector("a[*][-1]").steps == (Key("a"), All(), Index(-1))
    assert parse_selector('a[name="x.y]z"]').steps == (Key("a"), Filter("name", "x.y]z"))
    assert parse_selector("a.+b").steps == (Key("a"), Key("b", create=True))


def test_filter_by_id_index_and_nested_keys():
    assert paths("scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org") == [
        ("scenes", 0, "clips", 0, "script", "org")
    ]


def test_all_scenes_with_type_filter():
    assert paths("scenes[*].clips[type=image].source_url") == [
        ("scenes", 0, "clips", 1, "source_url")
    ]
    assert paths("scenes[*].clips[type=aiModel].script.org") == [
        ("scenes", 0, "clips", 0, "script", "org"),
        ("scenes", 1, "clips", 0, "script", "org"),
    ]


def test_index_background_name_and_negative_index():
    assert paths("scenes[1].background.source_url") == [("scenes", 1, "background", "source_url")]
    assert paths("scenes[*].clips[name=image-1hgur0eiu11].source_url") == [
        ("scenes", 0, "clips", 1, "source_url")
    ]
    assert paths("scenes[-1].clips[-1].video_url") == [("scenes", 1, "clips", 1, "video_url")]


def test_filter_compares_numbers_and_booleans_by_json_spelling():
    assert paths("scenes[*].clips[isDelete=true].id") == [("scenes", 1, "clips", 0, "id")]
    assert paths("scenes[*].clips[layer=2].id") == [
        ("scenes", 0, "clips", 1, "id"),
        ("scenes", 1, "clips", 1, "id"),
    ]


def test_legacy_selectors():
    assert paths("scenes[0].AIModel.script", LEGACY) == [("scenes", 0, "AIModel", "script")]
    assert paths("scenes[0].clips[1].detail.url", LEGACY) == [
        ("scenes", 0, "clips", 1, "detail", "url")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "scenes[5].background",
        "scenes[0].clips[id=nope].script",
        "scenes[0].clips[0].script.orgg",
        "scenes.clips",
        "scenes[0][0]",
        "nothing",
    ],
)
def test_no_match_is_empty_and_explained(text):
    selector = parse_selector(text)
    assert find(selector, PROMO) == []
    assert "nothing" in explain_no_match(selector, PROMO) or "has no" in explain_no_match(
        selector, PROMO
    )


def test_explanation_names_the_failing_step():
    message = explain_no_match(parse_selector("scenes[0].clips[id=nope].script"), PROMO)
    assert message == (
        "'[id=nope]' matches nothing inside 'scenes[0].clips' "
        "(id there: aiModel-1h4ij5h8e87, image-1hgur0eiu11)"
    )


@pytest.mark.parametrize(
    ("text", "position", "reason"),
    [
        ("", 0, "empty selector"),
        ("scenes[0", 8, "expected ']'"),
        ("scenes[0]x", 9, "expected '.' or '['"),
        ("scenes..clips", 7, "expected a key"),
        ("scenes[]", 7, "expected an index"),
        ("scenes[id]", 9, "expected '='"),
        ("scenes[id=]", 10, "empty filter value"),
        ("scenes[id='x]", 10, "unterminated"),
        ("scenes.", 7, "expected a key"),
        ("a.+b.c", 2, "only the last key may be new"),
    ],
)
def test_syntax_errors_show_the_position(text, position, reason):
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    assert info.value.position == position
    assert reason in str(info.value)
    assert f"position {position + 1}" in str(info.value)


def test_apply_patches_returns_new_document_and_leaves_template_untouched():
    before = copy.deepcopy(PROMO)
    patched = apply_patches(
        PROMO,
        [
            (parse_selector("scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org"), "Hi there"),
            (parse_selector("scenes[*].background.source_url"), "https://x/bg.png"),
        ],
    )
    assert before == PROMO
    assert patched["scenes"][0]["clips"][0]["script"]["org"] == "Hi there"
    assert [s["background"]["source_url"] for s in patched["scenes"]] == ["https://x/bg.png"] * 2
    assert patched["scenes"][1]["clips"][0]["script"]["org"] == ""


def test_later_patch_wins_and_values_are_not_shared():
    patched = apply_patches(
        PROMO,
        [
            (parse_selector("scenes[*].clips[type=aiModel].effects"), [{"type": "a"}]),
            (parse_selector("scenes[1].clips[type=aiModel].effects"), [{"type": "b"}]),
        ],
    )
    assert patched["scenes"][0]["clips"][0]["effects"] == [{"type": "a"}]
    assert patched["scenes"][1]["clips"][0]["effects"] == [{"type": "b"}]
    patched["scenes"][0]["clips"][0]["effects"].append(1)
    assert patched["scenes"][1]["clips"][0]["effects"] == [{"type": "b"}]


def test_one_patch_over_many_places_gives_each_its_own_copy():
    value = [{"type": "fade"}]
    patched = apply_patches(
        PROMO, [(parse_selector("scenes[*].clips[type=aiModel].effects"), value)]
    )
    first, second = (scene["clips"][0]["effects"] for scene in patched["scenes"])
    assert first == second == [{"type": "fade"}]
    first.append({"type": "zoom"})
    first[0]["type"] = "cut"
    assert second == [{"type": "fade"}]
    assert value == [{"type": "fade"}]


def test_new_field_only_when_marked():
    assert paths("scenes[0].AIModel.tag", LEGACY) == []
    patched = apply_patches(LEGACY, [(parse_selector("scenes[0].AIModel.+tag"), "promo")])
    assert patched["scenes"][0]["AIModel"]["tag"] == "promo"
    assert "tag" not in LEGACY["scenes"][0]["AIModel"]


def test_apply_patches_refuses_a_selector_without_match():
    with pytest.raises(SelectorMatchError, match=r"scenes\[0\]\.AIModel\.scrpt"):
        apply_patches(LEGACY, [(parse_selector("scenes[0].AIModel.scrpt"), "x")])
