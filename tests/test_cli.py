"""The command line through its real entry point (`python -m service`), as a user runs it."""

import importlib.metadata
import re
import urllib.request
from pathlib import Path

import pytest

from service.model import job_id_for
from tests.support.cli_runner import run_studiohook
from tests.support.mqtt_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def studiohook(*args, cwd=ROOT, timeout=60):
    return run_studiohook(*args, cwd=cwd, state_dir=cwd / "state-cli-test", timeout=timeout)


def test_help_says_what_studiohook_does_and_where_to_start():
    result = studiohook("--help")
    assert result.returncode == 0
    description = result.stdout.split("\n\n")[1]
    assert description == (
        "Turns business events (webhooks, MQTT messages) into AI Studios avatar videos."
    )
    assert "parsing and printing" not in result.stdout
    epilog = result.stdout.split("first steps:")[1]
    assert "studiohook check" in epilog
    assert "studiohook preview --route NAME --event FILE" in epilog
    # preview reads the store and may ask AI Studios or a video host: it is not "offline".
    assert "offline" not in result.stdout
    assert "nothing billed or written" in epilog
    words = " ".join(result.stdout.split())  # however argparse wraps the command list
    assert "(reads the store, may check a cached video's URL; bills and writes nothing)" in words
    assert "README.md" in epilog
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_version_comes_from_the_package_metadata():
    result = studiohook("--version")
    assert result.returncode == 0
    assert result.stdout == f"studiohook {importlib.metadata.version('studiohook')}\n"
    assert re.fullmatch(r"studiohook \d+\.\d+\.\d+\S*\n", result.stdout)


def test_check_accepts_the_shipped_config():
    result = studiohook("check")
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout
    assert "2 routes" in result.stdout
    assert "spending caps: none" in result.stdout
    assert "render cache and coalescing: none" in result.stdout


def test_check_lists_every_problem_with_its_location(tmp_path):
    (tmp_path / "t.json").write_text('{"scenes": [{"clips": [{"id": "a", "type": "image"}]}]}')
    (tmp_path / "config.toml").write_text(
        """
[[sources]]
name = "s"
kind = "json"
dedupe_key = "items[?"

[[templates]]
name = "t"
file = "t.json"

[[routes]]
name = "r"
source = "s"
template = "t"
colour = "red"
coalesce_key = "{{ product.id "
coalesce_seconds = 60
[routes.patches]
"scenes[0].clips[id=zzz].source_url" = "{{ product.title }}"
"scenes[0].clips[id=a].source_url" = "{{ product.title "
"""
    )
    result = studiohook("check", "--config", str(tmp_path / "config.toml"))
    assert result.returncode == 1
    err = result.stderr
    assert "routes[0].colour: unknown key" in err
    assert "routes[0].coalesce_key" in err
    assert "sources[0].dedupe_key" in err
    assert "scenes[0].clips[id=zzz].source_url" in err
    assert "zzz" in err
    assert "scenes[0].clips[id=a].source_url" in err
    assert "problem(s)" in err


def test_preview_prints_the_export_body_and_a_diff_where_no_service_has_run():
    result = studiohook(
        "preview", "--route", "new-product", "--event", "examples/shopify-product-create.json"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"name": "Ceramic Pour-Over Coffee Set #' in out
    assert "# diff against the template" in out
    assert '-            "org": "Hello, This is test video.",' in out
    assert '+            "org": "Meet Ceramic Pour-Over Coffee Set.' in out
    # No service has run here: preview says so, and creates no store file.
    store = ROOT / "state-cli-test" / "studiohook.db"
    assert f"#   the store {store} does not exist yet" in out
    assert "#   render cache: off (route new-product sets no cache_seconds)" in out
    assert "#   spending caps: none" in out
    assert not store.exists()


def test_preview_names_the_export_once_with_the_job_id_the_service_would_give():
    args = ("preview", "--route", "new-product", "--event", "examples/shopify-product-create.json")
    first, second = studiohook(*args), studiohook(*args)
    assert first.returncode == 0, first.stderr
    # The request header, the body and the diff all carry one name, the service's own.
    suffixes = set(re.findall(r"Coffee Set #(\w+)", first.stdout))
    webhook_id = "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"  # X-Shopify-Webhook-Id in the headers file
    assert suffixes == {job_id_for("shopify", f"h:{webhook_id}", "new-product")}
    assert first.stdout.count(f"Coffee Set #{suffixes.pop()}") == 3
    assert second.stdout == first.stdout


def test_preview_reports_a_mapping_error(tmp_path):
    event = tmp_path / "event.json"
    event.write_text(
        '{"id": 1, "title": "No picture", "body_html": "<p>x</p>", "variants": [{"price": "5.00"}]}'
    )
    result = studiohook("preview", "--route", "new-product", "--event", str(event))
    assert result.returncode == 1
    assert "product.image_url" in result.stderr


def test_submit_wait_on_the_shipped_config_uses_the_simulator_and_saves_an_mp4(tmp_path):
    video = tmp_path / "video.mp4"
    result = studiohook(
        "submit",
        "--route",
        "new-product",
        "--event",
        "examples/shopify-product-create.json",
        "--wait",
        "--poll-seconds",
        "0.5",
        "--download",
        str(video),
    )
    assert result.returncode == 0, result.stderr
    assert "using the built-in simulator" in result.stderr
    url = result.stdout.strip().splitlines()[-1]
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith(".mp4")
    assert video.read_bytes()[4:8] == b"ftyp"


def test_submit_against_a_standalone_simulator_prints_a_downloadable_url(
    tmp_path, simulator_process
):
    api_url = simulator_process(0.5).url  # returns once the simulator logged it listens
    config = (ROOT / "config.toml").read_text()
    config = config.replace(
        'api_key = "${AISTUDIOS_API_KEY:-}"',
        f'api_key = "dev-key"\nbase_url = "{api_url}"\nlegacy_base_url = "{api_url}"',
    )
    config = config.replace('file = "templates/', f'file = "{ROOT}/templates/')
    (tmp_path / "config.toml").write_text(config)
    result = studiohook(
        "submit",
        "--config",
        str(tmp_path / "config.toml"),
        "--route",
        "new-product",
        "--event",
        str(ROOT / "examples/shopify-product-create.json"),
        "--wait",
        "--poll-seconds",
        "0.2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "simulator" not in result.stderr
    url = result.stdout.strip().splitlines()[-1]
    assert url.startswith(f"{api_url}/")
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        assert response.headers["Content-Type"] == "video/mp4"
        assert response.read()[4:8] == b"ftyp"


def test_jobs_command_reports_an_unreachable_service(tmp_path):
    result = studiohook("jobs", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the service" in result.stderr
