"""The start-up summary: one human line in console mode, the structured events kept."""

import pytest
from structlog.testing import capture_logs

from service.config import load_config
from service.summary import startup_summary
from tests.support.service_fixtures import TEMPLATE, make_config, running_service, unique_prefix

API_KEY = "sk-live-4f1b0c9e7d"
MQTT_PASSWORD = "mqtt-pa55word"


def write_config(tmp_path, *, api="", store=""):
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"

[http]
listen = "0.0.0.0:8080"

[aistudios]
{api}

{store}

[mqtt]
url = "mqtt://ops:{MQTT_PASSWORD}@broker.internal:1884"

[[sources]]
name = "shop"
kind = "shopify"
secrets = ["s3cret-shop"]

[[sources]]
name = "sensors"
kind = "mqtt"
topic = "plant/+/done"
dedupe_key = "id"

[[sources]]
name = "cms"
kind = "strapi"
secrets = ["s3cret-cms"]

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "new-product"
source = "shop"
template = "promo"

[[routes]]
name = "product-update"
source = "shop"
template = "promo"

[[routes]]
name = "batch-done"
source = "sensors"
template = "promo"
"""
    )
    return load_config(path, env={})


def test_the_summary_says_where_it_listens_what_is_live_and_where_state_is(tmp_path):
    cfg = write_config(tmp_path)
    line = startup_summary(
        cfg, http_url="http://0.0.0.0:8080", api_url="http://127.0.0.1:4242", simulator=True
    )
    assert "\n" not in line
    assert line.startswith("studiohook is ready: listening on http://0.0.0.0:8080; ")
    assert "shop (POST /hooks/shop) -> new-product, product-update" in line
    assert "sensors (MQTT plant/+/done on broker.internal:1884) -> batch-done" in line
    assert "cms (POST /hooks/cms) -> no route" in line
    assert "built-in AI Studios simulator at http://127.0.0.1:4242 (nothing is billed)" in line
    assert line.endswith(f"state in {(tmp_path / 'state').resolve()} (SQLite studiohook.db)")
    assert MQTT_PASSWORD not in line
    assert "ops:" not in line


def test_on_the_real_api_the_summary_says_it_bills_and_prints_no_credential(tmp_path):
    cfg = write_config(
        tmp_path,
        api=f'api_key = "{API_KEY}"',
        store=f'[store]\nurl = "sqlite:///{tmp_path / "db" / "hooks.db"}"',
    )
    line = startup_summary(
        cfg,
        http_url="http://127.0.0.1:8080",
        api_url="https://user:pw@app.aistudios.com",
        simulator=False,
    )
    assert "renders on AI Studios at https://app.aistudios.com (exports are billed)" in line
    assert "simulator" not in line
    assert f"(SQLite {tmp_path / 'db' / 'hooks.db'})" in line
    for secret in (API_KEY, "user:pw", "pw@", "s3cret-shop", MQTT_PASSWORD):
        assert secret not in line


def test_a_shared_store_is_named_without_its_user_or_password(tmp_path):
    url = "postgresql://app:pg-s3cret@db.internal:5432/hooks?sslmode=require&password=pg-s3cret"
    cfg = write_config(tmp_path, store=f'[store]\nurl = "{url}"')
    line = startup_summary(
        cfg, http_url="http://127.0.0.1:8080", api_url="http://127.0.0.1:4242", simulator=True
    )
    printed = "postgresql://db.internal:5432/hooks?sslmode=require&password=***"
    assert f"(store {printed})" in line
    assert "pg-s3cret" not in line
    assert "app@" not in line


@pytest.mark.anyio
@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["console", "json"])
async def test_start_up_logs_the_summary_once_at_info_in_console_mode_only(
    tmp_path, mqtt_broker, log_format
):
    cfg = make_config(tmp_path, broker_port=mqtt_broker.port, prefix=unique_prefix())
    path = cfg.path
    path.write_text(
        path.read_text().replace("[service]", f'[service]\nlog_format = "{log_format}"')
    )
    cfg = load_config(path, env={})
    with capture_logs() as logs:
        async with running_service(cfg) as svc:
            pass
    ready = [e for e in logs if e["event"] == "service.ready"]
    assert len(ready) == 1  # the structured event stays
    summaries = [e for e in logs if e["event"].startswith("studiohook is ready")]
    if log_format == "json":
        assert summaries == []
        return
    (summary,) = summaries
    assert summary["log_level"] == "info"
    assert "component" not in summary
    assert f"listening on {svc.http_url};" in summary["event"]
    assert f"simulator at {svc.api_url}" in summary["event"]
    assert "shop (POST /hooks/shop) -> new-product" in summary["event"]
    assert logs.index(summary) == logs.index(ready[0]) + 1
