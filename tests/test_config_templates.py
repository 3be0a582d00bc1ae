"""`[[templates]]`: the four template sources and the errors that keep them apart."""

from pathlib import Path

import pytest

from service.config import ConfigError, load_config

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "product-promo.json"


def load(tmp_path: Path, template_table: str):
    path = tmp_path / "config.toml"
    path.write_text(f'[[templates]]\nname = "t"\n{template_table}\n')
    return load_config(path, env={})


def problems(tmp_path: Path, template_table: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, template_table)
    return {p.location: p.message for p in info.value.problems}


def test_each_source_loads_as_its_kind(tmp_path):
    assert load(tmp_path, f'file = "{TEMPLATE}"').templates[0].kind == "file"
    v3 = load(tmp_path, 'project_id = "p1"\napi = "v3"\nrefresh_seconds = 600').templates[0]
    assert (v3.kind, v3.project_id, v3.api, v3.refresh_seconds) == ("v3-project", "p1", "v3", 600)
    legacy = load(tmp_path, 'project_id = "p2"\napi = "legacy"').templates[0]
    assert (legacy.kind, legacy.refresh_seconds) == ("legacy-project", None)
    server = load(tmp_path, 'template_id = "tpl"\nlayout_project_id = "p3"').templates[0]
    assert (server.kind, server.template_id, server.layout_project_id) == (
        "server-template",
        "tpl",
        "p3",
    )


def test_a_saved_project_must_say_which_api_saved_it(tmp_path):
    found = problems(tmp_path, 'project_id = "p1"')
    assert list(found) == ["templates[0].api"]
    assert '"v3" for a project saved in today\'s editor' in found["templates[0].api"]
    assert '"legacy"' in found["templates[0].api"]


def test_api_must_be_v3_or_legacy(tmp_path):
    found = problems(tmp_path, 'project_id = "p1"\napi = "v2"')
    assert found == {"templates[0].api": "must be one of legacy, v3"}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("", "needs exactly one of file, project_id or template_id"),
        (
            'project_id = "p"\napi = "v3"\ntemplate_id = "t"',
            (
                "needs exactly one of file, project_id or template_id "
                "(found project_id and template_id)"
            ),
        ),
        (
            f'file = "{TEMPLATE}"\ntemplate_id = "t"',
            "needs exactly one of file, project_id or template_id (found file and template_id)",
        ),
    ],
)
def test_exactly_one_source(tmp_path, table, expected):
    assert problems(tmp_path, table)["templates[0]"] == expected


def test_keys_of_one_source_are_refused_on_another(tmp_path):
    found = problems(
        tmp_path, f'file = "{TEMPLATE}"\napi = "v3"\nrefresh_seconds = 60\nlayout_project_id = "x"'
    )
    assert found == {
        "templates[0].api": "applies only to project_id (a saved project)",
        "templates[0].refresh_seconds": "applies only to project_id (a saved project)",
        "templates[0].layout_project_id": "applies only to template_id",
    }


def test_refresh_seconds_has_a_floor_and_unknown_keys_fail(tmp_path):
    found = problems(tmp_path, 'project_id = "p"\napi = "v3"\nrefresh_seconds = 0\nttl = 5')
    assert found == {
        "templates[0].refresh_seconds": "must be at least 1",
        "templates[0].ttl": "unknown key",
    }
