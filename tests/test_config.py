import tomllib
from pathlib import Path

import pytest

from service.app import budget_limits
from service.config import ConfigError, load_config, parse_config

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "product-promo.json"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


MINIMAL = f"""
[[sources]]
name = "shop"
kind = "shopify"
secrets = ["s1"]

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "r"
source = "shop"
template = "promo"
events = ["products/create"]
[routes.patches]
"scenes[0].clips[type=image].source_url" = "{{{{ product.image_url }}}}"
"""


def locations(exc: ConfigError) -> dict[str, str]:
    return {p.location: p.message for p in exc.problems}


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.http.port == 8080
    assert cfg.aistudios.uses_simulator
    assert cfg.store.url == f"sqlite:///{tmp_path / 'state' / 'studiohook.db'}"
    assert cfg.routes[0].patches == (
        ("scenes[0].clips[type=image].source_url", "{{ product.image_url }}"),
    )
    assert cfg.source("shop").secrets == ("s1",)


def test_env_expansion_with_and_without_default(tmp_path):
    text = MINIMAL + '\n[aistudios]\napi_key = "${KEY}"\nbase_url = "${BASE:-http://x}"\n'
    cfg = load_config(write(tmp_path, text), env={"KEY": "k-123"})
    assert cfg.aistudios.api_key == "k-123"
    assert cfg.aistudios.base_url == "http://x"
    assert not cfg.aistudios.uses_simulator


def test_unset_variable_names_key_path(tmp_path):
    text = MINIMAL + '\n[aistudios]\napi_key = "${MISSING_KEY}"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert locations(info.value) == {
        "aistudios.api_key": "environment variable MISSING_KEY is not set"
    }


def test_unknown_keys_wrong_types_and_dangling_names_all_reported(tmp_path):
    text = (
        MINIMAL.replace('template = "promo"', 'template = "nope"')
        + """
[http]
listen = "nonsense"
max_body_bytes = "big"
colour = "blue"

[[routes]]
name = "r2"
source = "ghost"
template = "promo"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    found = locations(info.value)
    assert found["http.listen"] == "must be host:port"
    assert found["http.max_body_bytes"] == "must be an integer, not str"
    assert found["http.colour"] == "unknown key"
    assert found["routes[0].template"] == "no template named 'nope'"
    assert found["routes[1].source"] == "no source named 'ghost'"


def test_missing_template_file_and_secretless_signed_source(tmp_path):
    text = """
[[sources]]
name = "shop"
kind = "shopify"

[[templates]]
name = "t"
file = "missing.json"
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    found = locations(info.value)
    assert found["sources[0].secrets"] == "a shopify source needs a secret"
    assert "does not exist" in found["templates[0].file"]


def test_mqtt_url_parsing_and_requirement(tmp_path):
    text = MINIMAL + '\n[mqtt]\nurl = "mqtts://user:p%40ss@broker.example:8884"\n'
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.mqtt is not None
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("broker.example", 8884, True)
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("user", "p@ss")
    no_broker = MINIMAL + '\n[[notify]]\nkind = "mqtt"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, no_broker), env={})
    assert "mqtt" in locations(info.value)


def test_invalid_toml_is_one_clear_problem(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[service\n"), env={})
    assert "not valid TOML" in str(info.value)


def test_webhook_notify_needs_whsec_secret(tmp_path):
    text = MINIMAL + '\n[[notify]]\nkind = "webhook"\nurl = "http://x"\nsecret = "plain"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert locations(info.value) == {"notify[0].secret": "must be a whsec_ secret"}


def test_shipped_config_parses():
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "config.toml").read_text())
    cfg, problems = parse_config(data, root / "config.toml", env={})
    assert problems == []
    assert cfg.aistudios.uses_simulator
    assert {r.name for r in cfg.routes} == {"new-product", "device-product"}


def test_reconcile_waits_a_whole_render_deadline_unless_told_otherwise(tmp_path):
    text = MINIMAL + "\n[aistudios]\nrender_deadline_seconds = 3600\n"
    assert load_config(write(tmp_path, text), env={}).aistudios.reconcile_wait_s == 3600
    text = MINIMAL + "\n[aistudios]\nrender_deadline_seconds = 3600\nreconcile_wait_seconds = 60\n"
    assert load_config(write(tmp_path, text), env={}).aistudios.reconcile_wait_s == 60


def test_templates_export_in_two_steps_unless_one_step_is_chosen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.templates[0].export_flow == "two-step"
    assert cfg.aistudios.export_settle_s == 5.0
    one_step = MINIMAL.replace('name = "promo"\n', 'name = "promo"\nexport_flow = "one-step"\n')
    text = one_step + "\n[aistudios]\nexport_settle_seconds = 2.5\n"
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.templates[0].export_flow == "one-step"
    assert cfg.aistudios.export_settle_s == 2.5
    wrong = MINIMAL.replace('name = "promo"\n', 'name = "promo"\nexport_flow = "both"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, wrong), env={})
    assert "one-step" in locations(caught.value)["templates[0].export_flow"]


def test_budget_caps_and_a_route_cap_are_read_and_unset_means_no_cap(tmp_path):
    assert budget_limits(load_config(write(tmp_path, MINIMAL), env={})).enabled is False
    text = MINIMAL.replace('template = "promo"\n', 'template = "promo"\nmax_exports_per_day = 3\n')
    text += "\n[budget]\nexports_per_day = 50\nexports_per_month = 1000\n"
    limits = budget_limits(load_config(write(tmp_path, text), env={}))
    assert (limits.exports_per_day, limits.exports_per_month) == (50, 1000)
    assert limits.route_per_day == {"r": 3}
    bad = MINIMAL + "\n[budget]\nexports_per_day = -1\nper_week = 3\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bad), env={})
    problems = locations(caught.value)
    assert "budget.exports_per_day" in problems
    assert "budget.per_week" in problems


def test_the_render_cache_is_off_unless_a_route_sets_cache_seconds(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), env={}).routes[0].cache_seconds is None
    text = MINIMAL.replace('template = "promo"\n', 'template = "promo"\ncache_seconds = 3600\n')
    assert load_config(write(tmp_path, text), env={}).routes[0].cache_seconds == 3600.0
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text.replace("3600", "0")), env={})
    assert "routes[0].cache_seconds" in locations(caught.value)


def test_a_postgresql_store_and_the_instance_id_come_from_the_environment(tmp_path):
    text = (
        '[service]\ninstance = "${STUDIOHOOK_INSTANCE:-}"\n'
        '[store]\nurl = "${DATABASE_URL}"\n' + MINIMAL
    )
    env = {"DATABASE_URL": "postgresql://u:p@db/studiohook", "STUDIOHOOK_INSTANCE": "web-2"}
    cfg = load_config(write(tmp_path, text), env=env)
    assert cfg.store.url == "postgresql://u:p@db/studiohook"
    assert cfg.service.instance == "web-2"
    assert load_config(write(tmp_path, MINIMAL), env={}).service.instance == ""
