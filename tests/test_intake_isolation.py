"""No delivery can stop the intake: property tests over arbitrary payloads, headers and topics.

The sources use what users configure and what can raise on input nobody controls: a JMESPath
dedupe expression (`length(id)`, the expression of the reported crash), `when` conditions,
export-name templates and a user handler that raises anything. For every input the intake
commits an event (routed, ignored or dead-lettered) and acknowledges it, or the adapter answers
4xx for a delivery it cannot read or trust; nothing raises. The store is a real SQLite file, the
HTTP server a real aiohttp site on loopback, the broker the real Mosquitto.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import anyio
import anyio.abc
import orjson
import pytest
from aiohttp import web
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from service.catalog import load_catalog
from service.config import Config, SourceConfig, load_config
from service.ingress.dedupe import event_id_for
from service.ingress.mqtt import MqttIngress
from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.metrics import Metrics
from service.model import Acceptance, EventStatus, JobState, RawEvent, StoredEvent
from service.store.sqlite import SQLiteStore
from tests.support.mqtt_fixtures import BrokerAddress
from tests.support.service_fixtures import TEMPLATE

PATCH = '"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "{{ product.title }}"'
WAIT_S = 20


def config_text(prefix: str, broker_port: int) -> str:
    return f"""
[mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "{prefix}-ingress"

[[sources]]
name = "feed"
kind = "json"
dedupe_key = "length(id)"

[[sources]]
name = "items"
kind = "json"

[[sources]]
name = "locked"
kind = "token"
secrets = ["s3cret-token"]

[[sources]]
name = "sensors"
kind = "mqtt"
topic = "{prefix}/#"
dedupe_key = "payload.id"

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "fussy"
source = "feed"
template = "promo"
when = "product.title.startswith('a')"
export_name = "{{{{ product.title[0] }}}} {{{{ 100 // (product.price | int) }}}}"

[routes.patches]
{PATCH}

[[routes]]
name = "custom"
source = "items"
template = "promo"
handler = "tests.support.raising_handler:handle"
when = "product.title is not none and product.title | length > 2"
export_name = "{{{{ product.title | upper }}}}"

[routes.patches]
{PATCH}

[[routes]]
name = "plain"
source = "items"
template = "promo"

[routes.patches]
{PATCH}

[[routes]]
name = "sensor"
source = "sensors"
template = "promo"
events = ["{prefix}/#"]
when = "product.title is not none"
export_name = "{{{{ product.title.split('-')[1] }}}}"

[routes.patches]
{PATCH}
"""


# --- strategies ----------------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "title": st.none() | st.text(max_size=10) | ints | st.lists(st.text(max_size=3)),
        "price": json_scalars,
        "raise": st.sampled_from(
            [
                "KeyError",
                "TypeError",
                "ZeroDivisionError",
                "RecursionError",
                "UnicodeDecodeError",
                "Unprintable",
                "AssertionError",
                "wrong-type",
                "int-id",
            ]
        ),
        "payload": st.fixed_dictionaries({}, optional={"id": json_values}),
        "product": json_values,
    },
)
payloads = shaped | json_values
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=12)
header_values = st.text(max_size=24) | st.sampled_from(["\udcff\udc80", "bearer x", ""])
headers = st.dictionaries(header_names, header_values, max_size=4)


@dataclass
class Rig:
    portal: BlockingPortal
    cfg: Config
    store: SQLiteStore
    intake: StoreIntake
    metrics: Metrics

    def source(self, name: str) -> SourceConfig:
        found = self.cfg.source(name)
        assert found is not None
        return found

    def rows_of(self, source: str, event_id: str) -> list[StoredEvent]:
        return self.portal.call(
            functools.partial(self.store.list_events, source=source, event_id=event_id, limit=500)
        )

    def assert_committed(self, source: str, acceptance: Acceptance) -> StoredEvent:
        rows = [
            r for r in self.rows_of(source, acceptance.event_id) if r.status is acceptance.status
        ]
        assert rows, f"{acceptance} acknowledged but not in the inbox"
        row = rows[0]
        if row.status is EventStatus.DEAD_LETTERED:
            assert row.reason
            assert row.failed_step
        for job_id in acceptance.job_ids:
            assert self.portal.call(self.store.get_job, job_id) is not None
        return row


@contextmanager
def rig(tmp_path: Path, broker_port: int = 1883) -> Iterator[Rig]:
    prefix = f"sh-prop-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "config.toml"
    path.write_text(config_text(prefix, broker_port))
    cfg = load_config(path, env={})
    with start_blocking_portal(backend="asyncio") as portal:
        catalog, problems = portal.call(load_catalog, cfg)
        assert problems == []
        store = SQLiteStore(tmp_path / "inbox.db")
        portal.call(store.open)
        metrics = Metrics()
        intake = StoreIntake(store, catalog, metrics=metrics, sources=cfg.sources)
        try:
            yield Rig(portal, cfg, store, intake, metrics)
        finally:
            portal.call(store.close)


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the intake itself ---------------------------------------------------------------------


def test_every_delivery_is_committed_and_acknowledged_whatever_it_contains(tmp_path):
    with rig(tmp_path) as r:

        @PROPERTY
        @given(
            source=st.sampled_from(["feed", "items", "sensors"]),
            payload=payloads,
            header_map=headers,
            topic=st.text(max_size=20),
        )
        def check(source: str, payload: Any, header_map: Mapping[str, str], topic: str) -> None:
            src = r.source(source)
            body = orjson.dumps(payload)
            raw = RawEvent(
                source=source,
                payload=payload,
                headers=header_map,
                topic=f"{src.topic}/{topic}" if src.kind == "mqtt" else None,
            )
            acceptance = r.portal.call(r.intake.accept, src, raw, body)
            row = r.assert_committed(source, acceptance)
            how = payload.get("raise") if isinstance(payload, dict) else None
            if source == "items" and how not in {None, "wrong-type", "int-id"}:
                assert row.status is EventStatus.DEAD_LETTERED
                assert row.failed_step == "routes.custom.handler"

        check()
        counted = r.metrics.render().decode()
        assert "studiohook_dead_letters_total" in counted


def test_the_reported_crash_length_of_a_number_is_a_dead_letter_with_its_step(tmp_path):
    with rig(tmp_path) as r:
        src = r.source("feed")
        body = b'{"id": 5}'
        raw = RawEvent(source="feed", payload={"id": 5}, headers={})
        first = r.portal.call(r.intake.accept, src, raw, body)
        again = r.portal.call(r.intake.accept, src, raw, body)
    assert first.status is EventStatus.DEAD_LETTERED
    assert not first.duplicate
    assert again.duplicate
    assert again.event_id == first.event_id


def test_a_dead_letter_keeps_step_and_exception_type(tmp_path):
    with rig(tmp_path) as r:
        src = r.source("feed")
        body = b'{"id": 5}'
        acceptance = r.portal.call(
            r.intake.accept, src, RawEvent(source="feed", payload={"id": 5}, headers={}), body
        )
        (row,) = r.rows_of("feed", acceptance.event_id)
    assert row.failed_step == "dedupe_key"
    assert row.reason.startswith("dedupe_key: JMESPathTypeError: ")
    assert row.body == body


def test_a_failing_route_does_not_hold_back_the_others(tmp_path):
    with rig(tmp_path) as r:
        src = r.source("items")
        body = b'{"raise": "KeyError", "title": "lamp"}'
        raw = RawEvent(source="items", payload=orjson.loads(body), headers={})
        acceptance = r.portal.call(r.intake.accept, src, raw, body)
        row = r.assert_committed("items", acceptance)
        (job_id,) = acceptance.job_ids
        job = r.portal.call(r.store.get_job, job_id)
    assert row.status is EventStatus.DEAD_LETTERED
    assert row.failed_step == "routes.custom.handler"
    assert job.route == "plain"


# --- through the real HTTP server ----------------------------------------------------------


@dataclass
class HttpClient:
    url: str
    session: aiohttp.ClientSession

    async def post(self, path: str, body: bytes, header_map: Mapping[str, str]) -> tuple[int, Any]:
        async with self.session.post(
            f"{self.url}{path}", data=body, headers=header_map
        ) as response:
            text = await response.read()
            return response.status, orjson.loads(text)


async def _start_http(r: Rig) -> tuple[web.AppRunner, HttpClient]:
    app = web.Application()
    app.add_routes(
        webhook_routes(
            sources={s.name: s for s in r.cfg.sources},
            intake=r.intake,
            max_body_bytes=2048,
            body_timeout_s=5,
        )
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, HttpClient(f"http://{host}:{port}", aiohttp.ClientSession())


async def _stop_http(runner: web.AppRunner, client: HttpClient) -> None:
    await client.session.close()
    await runner.cleanup()


http_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24
)


@pytest.mark.integration
def test_the_http_intake_answers_2xx_after_a_commit_or_4xx_for_any_request(tmp_path):
    with rig(tmp_path) as r:
        runner, client = r.portal.call(_start_http, r)
        try:

            @settings(PROPERTY, max_examples=80)
            @given(
                source=st.sampled_from(["feed", "items", "locked", "nowhere"]),
                body=payloads.map(orjson.dumps) | st.binary(max_size=3000),
                header_map=st.dictionaries(
                    st.sampled_from(["x-trace", "authorization", "x-custom-id", "user-agent"]),
                    http_header_values,
                    max_size=3,
                ),
            )
            def check(source: str, body: bytes, header_map: Mapping[str, str]) -> None:
                status, answer = r.portal.call(client.post, f"/hooks/{source}", body, header_map)
                assert status in {200, 202, 400, 401, 404, 413}, (status, answer)
                if status >= 400:
                    assert answer["error"]
                    return
                acceptance = Acceptance(
                    event_id=answer["event_id"],
                    job_ids=tuple(answer["jobs"]),
                    duplicate=status == 200,
                    status=EventStatus(answer.get("status", "routed")),
                )
                r.assert_committed(source, acceptance)

            check()
        finally:
            r.portal.call(_stop_http, runner, client)


# --- through the real MQTT adapter ---------------------------------------------------------


class CountingIntake:
    """The real intake, telling the test how many deliveries it has finished."""

    def __init__(self, inner: StoreIntake) -> None:
        self._inner = inner
        self.finished: list[tuple[str, Acceptance]] = []
        self._changed = anyio.Event()

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        acceptance = await self._inner.accept(source, raw, body)
        self._record(source.name, acceptance)
        return acceptance

    async def dead_letter(
        self,
        source: SourceConfig,
        body: bytes,
        headers: Mapping[str, str],
        reason: str,
        topic: str | None = None,
    ) -> Acceptance:
        acceptance = await self._inner.dead_letter(source, body, headers, reason, topic)
        self._record(source.name, acceptance)
        return acceptance

    def _record(self, source: str, acceptance: Acceptance) -> None:
        self.finished.append((source, acceptance))
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(WAIT_S):
            while len(self.finished) < count:
                await self._changed.wait()


async def _publish(
    address: BrokerAddress, messages: list[tuple[str, bytes, dict[str, str]]]
) -> None:
    async with aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"prop-pub-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as publisher:
        for topic, body, props in messages:
            properties = None
            if props:
                properties = Properties(PacketTypes.PUBLISH)
                properties.UserProperty = list(props.items())
            await publisher.publish(topic, body, qos=1, properties=properties)


mqtt_messages = st.lists(
    st.tuples(
        st.text(alphabet="abcxyz/", max_size=8).filter(lambda t: "//" not in t),
        payloads.map(orjson.dumps) | st.binary(max_size=200),
        # Mosquitto drops a client whose strings carry control characters: printable text only.
        st.dictionaries(
            header_names,
            st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), max_size=12),
            max_size=2,
        ),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.integration
def test_the_mqtt_intake_acknowledges_every_message_after_its_commit(tmp_path, mqtt_broker):
    with rig(tmp_path, mqtt_broker.port) as r:
        counting = CountingIntake(r.intake)
        mqtt = r.cfg.mqtt
        assert mqtt is not None
        source = r.source("sensors")
        prefix = (source.topic or "").removesuffix("/#")

        def ingress() -> MqttIngress:
            return MqttIngress(
                config=mqtt,
                sources=[source],
                intake=counting,
                backoff_min_s=0.02,
                backoff_max_s=0.2,
            )

        def start() -> tuple[Any, anyio.Event]:
            stop = r.portal.call(anyio.Event)
            future, _ = r.portal.start_task(_run_until, ingress(), stop, name="mqtt-ingress")
            return future, stop

        def stop_and_wait(future: Any, stop: anyio.Event) -> None:
            r.portal.call(stop.set)
            future.result(timeout=WAIT_S)

        future, stop = start()
        published = 0

        @settings(PROPERTY, max_examples=6)
        @given(messages=mqtt_messages)
        def check(messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
            nonlocal published
            batch = [(f"{prefix}/{t.strip('/') or 'x'}", b, p) for t, b, p in messages]
            r.portal.call(_publish, mqtt_broker, batch)
            published += len(batch)
            r.portal.call(counting.wait_for, published)
            for name, acceptance in counting.finished[-len(batch) :]:
                r.assert_committed(name, acceptance)

        check()
        stop_and_wait(future, stop)
        assert len(counting.finished) == published

        # Everything was acknowledged: the same session, connected again, is handed only the
        # sentinel published meanwhile (an un-acked message would come before it).
        sentinel = f"sentinel-{uuid.uuid4().hex[:6]}"
        body = orjson.dumps({"payload": {"id": sentinel}})
        r.portal.call(_publish, mqtt_broker, [(f"{prefix}/sentinel", body, {})])
        future, stop = start()
        r.portal.call(counting.wait_for, published + 1)
        stop_and_wait(future, stop)
        assert len(counting.finished) == published + 1
        assert counting.finished[-1][1].event_id == event_id_for(None, f"j:{sentinel}")


async def _run_until(
    ingress: MqttIngress,
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(ingress.run)
        task_status.started()
        await stop.wait()
        tg.cancel_scope.cancel()


def test_an_event_the_store_refuses_is_kept_as_a_dead_letter_of_step_commit(tmp_path):
    with rig(tmp_path) as r:
        refuse = (
            "CREATE TRIGGER refuse_plain BEFORE INSERT ON jobs WHEN NEW.route = 'plain'"
            " BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END"
        )
        r.portal.call(r.store._write, lambda conn: conn.execute(refuse))
        src = r.source("items")
        body = b'{"title": "lamp"}'
        raw = RawEvent(source="items", payload=orjson.loads(body), headers={})
        acceptance = r.portal.call(r.intake.accept, src, raw, body)
        row = r.assert_committed("items", acceptance)
        assert acceptance.job_ids == ()
        assert row.failed_step == "commit"
        assert "IntegrityError: refused by a constraint" in row.reason
        assert r.portal.call(r.store.jobs_in_states, {JobState.RECEIVED}) == []
