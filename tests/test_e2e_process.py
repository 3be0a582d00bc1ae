"""The daemon as a real process: events in over HTTP and MQTT, videos announced on every target."""

import signal
import sys

import aiohttp
import aiomqtt
import anyio
import anyio.to_thread
import orjson
import pytest

from tests.support.daemon_fixtures import ChildProcess
from tests.support.mqtt_fixtures import free_port
from tests.support.service_fixtures import (
    EXAMPLES,
    SHOPIFY_SECRET,
    WEBHOOK_SECRET,
    eventually,
    service_config_text,
    shopify_headers,
    unique_prefix,
    webhook_receiver,
)

pytestmark = pytest.mark.integration


@pytest.mark.anyio
async def test_daemon_process_turns_webhooks_and_mqtt_into_announced_videos(
    tmp_path, mqtt_broker, daemon_factory
):
    prefix = unique_prefix()
    body = (EXAMPLES / "shopify-product-create.json").read_bytes()
    async with webhook_receiver() as (hook_url, receiver):
        config = service_config_text(
            tmp_path, broker_port=mqtt_broker.port, prefix=prefix, webhook_url=hook_url
        ).replace('log_level = "warning"', 'log_level = "info"\nlog_format = "json"')
        daemon = daemon_factory(config)
        base = await anyio.to_thread.run_sync(daemon.start)
        async with (
            aiomqtt.Client("127.0.0.1", mqtt_broker.port, identifier=f"{prefix}-watch") as bus,
            aiohttp.ClientSession() as http,
        ):
            await bus.subscribe(f"{prefix}/videos/#", qos=1)
            async with http.post(
                f"{base}/hooks/shop", data=body, headers=shopify_headers(body, "proc-1")
            ) as response:
                assert response.status == 202
                shop_job = (await response.json())["jobs"][0]
            forged = {**shopify_headers(body, "proc-forged"), "X-Shopify-Hmac-Sha256": "Zm9yZ2Vk"}
            async with http.post(f"{base}/hooks/shop", data=body, headers=forged) as response:
                assert response.status == 401
            device = {"id": "proc-dev", "title": "Lamp", "image_url": "https://img.example/l.png"}
            await bus.publish(f"{prefix}/in/lamps", orjson.dumps(device), qos=1)

            ready = {}
            with anyio.fail_after(30):
                async for message in bus.messages:
                    payload = orjson.loads(message.payload)
                    ready[payload["job_id"]] = payload
                    if len(ready) == 2:
                        break
            assert shop_job in ready
            assert {p["type"] for p in ready.values()} == {"video.ready"}
            for payload in ready.values():
                async with http.get(payload["download_url"]) as video:
                    assert (await video.read())[4:8] == b"ftyp"

            jsonl = tmp_path / "videos.jsonl"

            async def announced_everywhere():
                lines = jsonl.read_bytes().splitlines() if jsonl.exists() else []
                return len(receiver.deliveries) >= 2 and len(lines) >= 2

            await eventually(announced_everywhere, timeout_s=20, what="webhook and file")
            assert receiver.bad_signatures == 0
            hooked = {orjson.loads(b)["job_id"] for _, b in receiver.deliveries}
            assert hooked == set(ready)

        daemon.current.send(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: daemon.current.wait_exit(10)) == 0
        assert daemon.current.events("service.stopped")
        logs = "\n".join(daemon.current.lines)
        assert "never retrieved" not in logs
        assert "proc-forged" in logs  # the rejection was logged ...
        for secret in (SHOPIFY_SECRET, WEBHOOK_SECRET, "Zm9yZ2Vk"):
            assert secret not in logs  # ... without any secret or signature


def test_sigterm_during_start_up_with_the_broker_down_stops_cleanly(tmp_path):
    config = service_config_text(tmp_path, broker_port=free_port(), prefix=unique_prefix()).replace(
        'log_level = "warning"', 'log_level = "info"\nlog_format = "json"'
    )
    path = tmp_path / "config.toml"
    path.write_text(config)
    run = ChildProcess(
        [sys.executable, "-m", "service", "serve", "--config", str(path)], name="daemon"
    )
    try:
        assert run.wait_for(lambda r: r.get("event") == "http.listening", what="http up")
        assert run.wait_for_text("mqtt", timeout_s=10)  # trying to reach the broker
        assert not run.events("service.ready")
        run.send(signal.SIGTERM)
        assert run.wait_exit(10) == 0
        assert run.events("service.stopped")
        assert not [line for line in run.lines if "never retrieved" in line]
    finally:
        run.kill()
