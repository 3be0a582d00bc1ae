"""Saved projects and server-side templates as catalog entries: fetched, checked, refreshed."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from service.aistudios.simulator_v3 import (
    SAMPLE_LAYOUT_PROJECT_ID,
    SAMPLE_PROJECT_ID,
    SAMPLE_TEMPLATE_ID,
    sample_saved_project,
)
from service.catalog import load_catalog
from service.config import load_config
from service.template_refresh import (
    OK,
    Freshness,
    TemplateRefresher,
    due_for_refresh,
    next_refresh_at,
)
from tests.support.fakes import FakeClock
from tests.support.service_fixtures import eventually

pytestmark = pytest.mark.anyio

SAVED_PATCHES = """
[routes.patches]
"scenes[0].clips[tag=parrot-image].source_url" = "{{ product.image_url }}"
"scenes[*].clips[tag=title].text" = "{{ product.title }}"
"scenes[1].scripts[1].org" = "Only {{ product.price }}."
"""


def config_text(template: str, patches: str = SAVED_PATCHES) -> str:
    return f"""
[[sources]]
name = "shop"
kind = "json"

[[templates]]
name = "t"
{template}

[[routes]]
name = "r"
source = "shop"
template = "t"
{patches}
"""


def load(tmp_path: Path, template: str, patches: str = SAVED_PATCHES):
    path = tmp_path / "config.toml"
    path.write_text(config_text(template, patches))
    return load_config(path, env={})


# --- the refresh schedule, pure -----------------------------------------------------------


def test_due_and_next_refresh():
    freshness = {
        "a": Freshness(fetched_at=100.0, refresh_s=60.0),
        "b": Freshness(fetched_at=130.0, refresh_s=10.0),
        "c": Freshness(fetched_at=0.0, refresh_s=None),
    }
    assert next_refresh_at(freshness) == 140.0
    assert due_for_refresh(freshness, 139.9) == []
    assert due_for_refresh(freshness, 140.0) == ["b"]
    assert due_for_refresh(freshness, 160.0) == ["a", "b"]
    assert next_refresh_at({"c": freshness["c"]}) == float("inf")


# --- start-up and check: fetched and checked against what is there ------------------------


async def test_a_saved_v3_project_becomes_the_template(tmp_path, aistudios_client):
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"')
    catalog, problems = await load_catalog(cfg, aistudios_client)
    assert problems == []
    assert catalog.templates["t"] == sample_saved_project()
    assert "t" not in catalog.legacy
    assert "r" in catalog.routes


async def test_a_tag_that_does_not_exist_is_reported_with_the_tags_that_do(
    tmp_path, aistudios_client
):
    patches = '[routes.patches]\n"scenes[0].clips[tag=parrot-picture].source_url" = "x"\n'
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"', patches)
    _, problems = await load_catalog(cfg, aistudios_client)
    assert [(p.location, p.message) for p in problems] == [
        (
            'routes[0].patches."scenes[0].clips[tag=parrot-picture].source_url"',
            (
                "selector matches nothing in template 't': '[tag=parrot-picture]' matches "
                "nothing inside 'scenes[0].clips' (tag there: parrot-image, parrot-text, title)"
            ),
        )
    ]


async def test_offline_a_saved_project_is_checked_for_syntax_only(tmp_path):
    patches = '[routes.patches]\n"scenes[0].clips[tag=parrot-picture].source_url" = "x"\n'
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"', patches)
    catalog, problems = await load_catalog(cfg)
    assert problems == []
    assert "t" not in catalog.templates


async def test_a_saved_project_that_cannot_be_read_is_a_problem(tmp_path, aistudios_client):
    cfg = load(tmp_path, 'project_id = "gone"\napi = "v3"')
    _, problems = await load_catalog(cfg, aistudios_client)
    assert [(p.location, p.message) for p in problems] == [
        ("templates[0].project_id", "could not be read: project not found")
    ]


async def test_a_legacy_saved_project_still_comes_through_the_older_api(tmp_path, aistudios_client):
    patches = '[routes.patches]\n"scenes[0].AIModel.script" = "Hi"\n'
    cfg = load(tmp_path, 'project_id = "sample-project"\napi = "legacy"', patches)
    catalog, problems = await load_catalog(cfg, aistudios_client)
    assert problems == []
    assert catalog.legacy == frozenset({"t"})
    assert "AIModel" in catalog.templates["t"]["scenes"][0]


UPDATES = """
[routes.patches]
title = "{{ product.title }}"
title_2 = "x"
subtitles = "x"
scripts_1 = "x"
"""


async def test_server_template_updates_keys_checked_against_its_layout(tmp_path, aistudios_client):
    table = (
        f'template_id = "{SAMPLE_TEMPLATE_ID}"\nlayout_project_id = "{SAMPLE_LAYOUT_PROJECT_ID}"'
    )
    catalog, problems = await load_catalog(load(tmp_path, table, UPDATES), aistudios_client)
    assert problems == []
    assert catalog.server_templates == {"t": SAMPLE_TEMPLATE_ID}

    bad = '[routes.patches]\ntitle_3 = "x"\nsubtitles_1 = "x"\nscripts_2 = "x"\nimage = "x"\n'
    bad += 'title = "x"\ntitle_0 = "y"\n'
    _, problems = await load_catalog(load(tmp_path, table, bad), aistudios_client)
    found = {p.location.removeprefix("routes[0].patches."): p.message for p in problems}
    tags = "tags there: parrot-image (1), subtitles (1), title (3)"
    assert found == {
        '"title_3"': f"template 't': 'title_3' addresses clip 4 tagged 'title', but the "
        f"template has 3; {tags}",
        '"subtitles_1"': "template 't': 'subtitles_1' addresses clip 2 tagged 'subtitles', "
        f"but the template has 1; {tags}",
        '"scripts_2"': "template 't': 'scripts_2' addresses scene 3, but the template has 2",
        '"image"': "'image' is not an updates key: use title, subtitles or scripts, "
        "optionally with a suffix _N (title_2 is the third clip tagged title)",
        '"title_0"': "addresses the same place as 'title'",
    }


async def test_server_template_keys_are_checked_offline_too(tmp_path):
    cfg = load(tmp_path, 'template_id = "tpl"', '[routes.patches]\nsubtitle = "x"\n')
    _, problems = await load_catalog(cfg)
    assert [p.location for p in problems] == ['routes[0].patches."subtitle"']
    assert "is not an updates key" in problems[0].message


# --- reload and refresh ------------------------------------------------------------------


def saved_image(simulator) -> dict:
    return simulator.saved_v3_projects[SAMPLE_PROJECT_ID].scenes[0]["clips"][1]


async def test_a_reload_swaps_in_the_edited_project(tmp_path, aistudios_client, simulator):
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"')
    catalog, _ = await load_catalog(cfg, aistudios_client)
    refresher = TemplateRefresher(cfg, catalog, aistudios_client)
    saved_image(simulator)["opacity"] = 50
    assert await refresher.refresh(["t"]) == {"t": OK}
    assert catalog.templates["t"]["scenes"][0]["clips"][1]["opacity"] == 50


async def test_an_edit_that_breaks_a_route_is_refused_and_the_old_project_kept(
    tmp_path, aistudios_client, simulator
):
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"')
    catalog, _ = await load_catalog(cfg, aistudios_client)
    before = catalog.templates["t"]
    refresher = TemplateRefresher(cfg, catalog, aistudios_client)
    saved_image(simulator)["tag"] = "bird-image"
    outcome = (await refresher.refresh(["t"]))["t"]
    assert outcome.startswith("kept the previous version: routes[0].patches.")
    assert "(tag there: bird-image, parrot-text, title)" in outcome
    assert catalog.templates["t"] is before

    del simulator.saved_v3_projects[SAMPLE_PROJECT_ID]
    outcome = (await refresher.refresh(["t"]))["t"]
    assert outcome == "kept the previous version: could not be read: project not found"
    assert catalog.templates["t"] is before


async def test_the_loop_reloads_on_request_and_when_refresh_seconds_pass(
    tmp_path, aistudios_client, simulator
):
    clock = FakeClock()
    cfg = load(tmp_path, f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"\nrefresh_seconds = 60')
    catalog, _ = await load_catalog(cfg, aistudios_client)
    refresher = TemplateRefresher(cfg, catalog, aistudios_client, clock=clock)

    def opacity():
        return catalog.templates["t"]["scenes"][0]["clips"][1].get("opacity")

    async with anyio.create_task_group() as tg:
        tg.start_soon(refresher.run)
        saved_image(simulator)["opacity"] = 10
        refresher.requests.request()  # SIGHUP or `studiohook reload`

        async def reloaded():
            return opacity() == 10

        await eventually(reloaded, timeout_s=5, what="reload")
        saved_image(simulator)["opacity"] = 20
        clock.advance(61)
        refresher.requests.request()  # only wakes the loop; the fake clock says it is due

        async def refreshed():
            return opacity() == 20

        await eventually(refreshed, timeout_s=5, what="refresh after refresh_seconds")
        assert refresher.freshness["t"].fetched_at == clock()
        tg.cancel_scope.cancel()


async def test_a_refused_edit_names_the_route_by_its_place_in_the_config(
    tmp_path, aistudios_client, simulator
):
    template = Path(__file__).resolve().parent.parent / "templates" / "product-promo.json"
    text = config_text(f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"')
    text = text.replace(
        "[[templates]]",
        f'[[templates]]\nname = "file"\nfile = "{template}"\n\n'
        '[[routes]]\nname = "first"\nsource = "shop"\ntemplate = "file"\n\n[[templates]]',
        1,
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    cfg = load_config(path, env={})
    assert [r.template for r in cfg.routes] == ["file", "t"]
    catalog, problems = await load_catalog(cfg, aistudios_client)
    assert problems == []
    saved_image(simulator)["tag"] = "bird-image"
    outcome = (await TemplateRefresher(cfg, catalog, aistudios_client).refresh(["t"]))["t"]
    assert outcome.startswith(
        "kept the previous version: "
        'routes[1].patches."scenes[0].clips[tag=parrot-image].source_url": '
    )
