"""`check` and `reload` for saved projects and server-side templates, through the real CLI."""

from pathlib import Path

import orjson
import pytest

from service.aistudios.simulator_v3 import (
    SAMPLE_LAYOUT_PROJECT_ID,
    SAMPLE_PROJECT_ID,
    SAMPLE_TEMPLATE_ID,
    sample_saved_project,
)
from tests.support.cli_runner import run_studiohook
from tests.support.mqtt_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def studiohook(*args, cwd: Path, timeout=60):
    return run_studiohook(*args, cwd=cwd, state_dir=cwd / "state", timeout=timeout)


def config(api: str) -> str:
    return f"""
{api}

[[sources]]
name = "shop"
kind = "json"

[[templates]]
name = "parrot"
project_id = "{SAMPLE_PROJECT_ID}"
api = "v3"

[[templates]]
name = "promo"
template_id = "{SAMPLE_TEMPLATE_ID}"
layout_project_id = "{SAMPLE_LAYOUT_PROJECT_ID}"

[[routes]]
name = "parrot-route"
source = "shop"
template = "parrot"
[routes.patches]
"scenes[0].clips[tag=parrot-img].source_url" = "{{{{ product.image_url }}}}"
"scenes[1].scripts[1].org" = "{{{{ product.title }}}}"

[[routes]]
name = "promo-route"
source = "shop"
template = "promo"
[routes.patches]
title = "{{{{ product.title }}}}"
title_5 = "x"
subtitle = "x"
"""


def test_check_with_credentials_reads_saved_projects_and_names_what_exists(
    tmp_path, simulator_process
):
    url = simulator_process(0.5).url
    api = f'[aistudios]\napi_key = "k"\nbase_url = "{url}"\nlegacy_base_url = "{url}"'
    (tmp_path / "config.toml").write_text(config(api))
    result = studiohook("check", "--config", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("✗")]
    assert len(lines) == 3, result.stderr
    assert (
        'routes[0].patches."scenes[0].clips[tag=parrot-img].source_url": selector matches '
        "nothing in template 'parrot': '[tag=parrot-img]' matches nothing inside "
        "'scenes[0].clips' (tag there: parrot-image, parrot-text, title)"
    ) in lines[0]
    assert (
        "routes[1].patches.\"title_5\": template 'promo': 'title_5' addresses clip 6 tagged "
        "'title', but the template has 3"
    ) in result.stderr
    assert "routes[1].patches.\"subtitle\": 'subtitle' is not an updates key" in result.stderr


def test_check_without_credentials_says_saved_projects_are_checked_offline(tmp_path):
    (tmp_path / "config.toml").write_text(config("").replace('title_5 = "x"\nsubtitle = "x"', ""))
    result = studiohook("check", "--config", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "saved projects are checked for syntax only" in result.stderr


def test_reload_reports_an_unreachable_service(tmp_path):
    (tmp_path / "config.toml").write_text(config(""))
    result = studiohook(
        "reload",
        "--config",
        str(tmp_path / "config.toml"),
        "--url",
        f"http://127.0.0.1:{free_port()}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "cannot reach the service" in result.stderr


PREVIEW = """
{api}
[[sources]]
name = "shop"
kind = "shopify"
secrets = ["s"]

[[templates]]
name = "parrot"
project_id = "{project}"
api = "v3"

[[templates]]
name = "promo"
template_id = "{template}"

[[routes]]
name = "parrot-route"
source = "shop"
template = "parrot"
export_name = "{{{{ product.title }}}}"
[routes.patches]
"scenes[0].clips[tag=parrot-image].source_url" = "{{{{ product.image_url }}}}"
"scenes[1].scripts[1].org" = "Only {{{{ product.price }}}}."

[[routes]]
name = "promo-route"
source = "shop"
template = "promo"
export_name = "{{{{ product.title }}}}"
[routes.patches]
title = "{{{{ product.title }}}}"
scripts_1 = "Only {{{{ product.price }}}}."
"""


def preview(tmp_path, route, api=""):
    text = PREVIEW.format(api=api, project=SAMPLE_PROJECT_ID, template=SAMPLE_TEMPLATE_ID)
    (tmp_path / "config.toml").write_text(text)
    return studiohook(
        "preview",
        "--config",
        str(tmp_path / "config.toml"),
        "--route",
        route,
        "--event",
        str(ROOT / "examples/shopify-product-create.json"),
        cwd=tmp_path,
    )


def printed_request(stdout: str) -> tuple[str, dict]:
    lines = stdout.splitlines()
    end = lines.index("}")
    return lines[0], orjson.loads("\n".join(lines[1 : end + 1]))


def test_preview_of_a_server_template_shows_the_template_modify_request(tmp_path):
    result = preview(tmp_path, "promo-route")
    assert result.returncode == 0, result.stderr
    head, body = printed_request(result.stdout)
    assert head.startswith(
        "# POST https://app.aistudios.com/api/odin/v3/template/modify  (server-side template)"
    )
    event = orjson.loads((ROOT / "examples/shopify-product-create.json").read_bytes())
    assert body == {
        "templateId": SAMPLE_TEMPLATE_ID,
        "name": body["name"],
        "updates": {"title": event["title"], "scripts_1": f"Only {event['variants'][0]['price']}."},
        "isExport": True,
    }
    assert body["name"].startswith(event["title"])


def test_preview_of_a_saved_v3_project_reads_it_and_shows_the_export(tmp_path, simulator_process):
    url = simulator_process(0.5).url
    api = f'[aistudios]\napi_key = "k"\nbase_url = "{url}"\nlegacy_base_url = "{url}"'
    result = preview(tmp_path, "parrot-route", api)
    assert result.returncode == 0, result.stderr
    head, body = printed_request(result.stdout)
    assert head.startswith(f"# POST {url}/api/odin/v3/editor/project  (v3 export)")
    event = orjson.loads((ROOT / "examples/shopify-product-create.json").read_bytes())
    saved = sample_saved_project()
    image = saved["scenes"][0]["clips"][1]
    assert body["scenes"][0]["clips"][1] == {**image, "source_url": event["image"]["src"]}
    assert body["scenes"][0]["clips"][2:] == saved["scenes"][0]["clips"][2:]
    assert [s["org"] for s in body["scenes"][1]["scripts"]] == [
        "What do parrots eat?",
        f"Only {event['variants'][0]['price']}.",
    ]
    assert set(body) == {"name", "orientation", "scenes"}
    diff = result.stdout.split("# diff against the template", 1)[1].splitlines()
    assert [
        line[0] + line[1:].strip()
        for line in diff
        if line.startswith(("-", "+")) and "source_url" in line
    ] == [
        '-"source_url": "https://cdn-studio.aistudios.com/images/parrot.jpg",',
        f'+"source_url": "{event["image"]["src"]}",',
    ]


def test_preview_of_a_saved_project_without_credentials_says_why_not(tmp_path):
    result = preview(tmp_path, "parrot-route")
    assert result.returncode == 1
    assert "preview reads it from AI Studios, which needs credentials" in result.stderr
