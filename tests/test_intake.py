import anyio
import orjson
import pytest

from service.catalog import load_catalog
from service.config import load_config
from service.intake import StoreIntake, safe_headers
from service.jobs.prepare import Preparer
from service.model import EventStatus, JobState, RawEvent
from tests.support.service_fixtures import TEMPLATE

CONFIG = f"""
[[sources]]
name = "items"
kind = "json"

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "custom"
source = "items"
template = "promo"
handler = "tests.support.custom_handler:handle"
when = "product.title is not none"
export_name = "{{{{ product.title }}}}"

[routes.patches]
"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "{{{{ product.title }}}}"
"""

pytestmark = pytest.mark.anyio


async def test_a_routes_own_handler_decides_when_and_the_export_name(tmp_path, store):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    cfg = load_config(path, env={})
    catalog, problems = await load_catalog(cfg)
    assert problems == []
    intake = StoreIntake(store, catalog)
    body = orjson.dumps({"item": {"label": "Lamp"}})
    raw = RawEvent(source="items", payload=orjson.loads(body), headers={})
    acceptance = await intake.accept(cfg.sources[0], raw, body)
    assert acceptance.status is EventStatus.ROUTED
    (job_id,) = acceptance.job_ids
    job = await store.get_job(job_id)
    assert job.state is JobState.RECEIVED
    assert job.export_name == ""  # rendered when the job is mapped, not before the ack
    await Preparer(cfg, catalog, store, no_outbox)(job)
    mapped = await store.get_job(job_id)
    assert mapped.state is JobState.MAPPED
    assert mapped.export_name == f"Custom Lamp #{job_id}"
    assert orjson.loads(mapped.export_body)["name"] == mapped.export_name


async def test_an_export_name_that_cannot_be_rendered_rejects_its_job_at_mapping(tmp_path, store):
    path = tmp_path / "config.toml"
    broken = 'export_name = "{{ 100 // (product.title | length - 11) }}"'
    path.write_text(CONFIG.replace('export_name = "{{ product.title }}"', broken))
    cfg = load_config(path, env={})
    catalog, _ = await load_catalog(cfg)
    body = orjson.dumps({"item": {"label": "Lamp"}})
    raw = RawEvent(source="items", payload=orjson.loads(body), headers={})
    acceptance = await StoreIntake(store, catalog).accept(cfg.sources[0], raw, body)
    assert acceptance.status is EventStatus.ROUTED  # the event itself is fine: acknowledged
    (job_id,) = acceptance.job_ids
    await Preparer(cfg, catalog, store, no_outbox)(await store.get_job(job_id))
    job = await store.get_job(job_id)
    assert job.state is JobState.REJECTED
    assert job.error_code == "mapping_error"
    assert job.error_message.startswith("export_name: ZeroDivisionError: ")


def no_outbox(job, event_type):
    return ()


async def test_a_routes_handler_that_fails_dead_letters_the_event_with_its_step(tmp_path, store):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    cfg = load_config(path, env={})
    catalog, _ = await load_catalog(cfg)
    intake = StoreIntake(store, catalog)
    body = b'{"item": {}}'
    raw = RawEvent(source="items", payload=orjson.loads(body), headers={})
    with anyio.fail_after(5):
        acceptance = await intake.accept(cfg.sources[0], raw, body)
    assert acceptance.status is EventStatus.DEAD_LETTERED
    assert acceptance.job_ids == ()
    (event,) = await store.list_events(status=EventStatus.DEAD_LETTERED)
    assert event.failed_step == "routes.custom.handler"
    assert "KeyError" in event.reason
    assert event.body == body


async def test_check_accepts_a_header_name_as_dedupe_key_and_refuses_bad_jmespath(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace('kind = "json"', 'kind = "json"\ndedupe_key = "X-Request-Id"'))
    _, problems = await load_catalog(load_config(path, env={}))
    assert problems == []
    path.write_text(CONFIG.replace('kind = "json"', 'kind = "json"\ndedupe_key = "items[?"'))
    _, problems = await load_catalog(load_config(path, env={}))
    assert [p.location for p in problems] == ["sources[0].dedupe_key"]


async def test_check_refuses_an_mqtt_topic_template_with_an_unknown_placeholder(tmp_path):
    path = tmp_path / "config.toml"
    text = (
        CONFIG
        + '\n[mqtt]\nurl = "mqtt://127.0.0.1"\n\n[[notify]]\nkind = "mqtt"\ntopic = "v/{rout}"\n'
    )
    path.write_text(text)
    _, problems = await load_catalog(load_config(path, env={}))
    assert [p.location for p in problems] == ["notify[0].topic"]
    assert "rout" in problems[0].message


def test_headers_are_made_storable_in_a_dict_of_their_own():
    ascii_headers = {"x-shopify-topic": "products/create", "content-type": "application/json"}
    copied = safe_headers(ascii_headers)
    assert copied == ascii_headers
    copied.pop("content-type")  # what a route handler may do to the headers it is given
    assert "content-type" in ascii_headers
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")
    stored = safe_headers({"x-note": undecodable, "x-city": "Zürich", "x-odd": "a\ud800b"})
    assert stored == {"x-note": "caf\ufffd", "x-city": "Zürich", "x-odd": "a?b"}
    assert all(k.encode() and v.encode() for k, v in stored.items())  # UTF-8 encodable now
