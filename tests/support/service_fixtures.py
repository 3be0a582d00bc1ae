"""Run the whole service in-process against the simulator, a real broker and real SQLite."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from service.aistudios.simulator import SimulatorKnobs
from service.app import Running, run_service
from service.config import Config, load_config
from service.ingress.signatures import sign_standard
from tests.support.loopback import serve_app

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "templates" / "product-promo.json"
EXAMPLES = ROOT / "examples"
SHOPIFY_SECRET = "shpss_e2e_secret"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

PATCHES = """
[routes.patches]
"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "Meet {{ product.title }}."
"scenes[0].clips[type=image].source_url" = "{{ product.image_url }}"
"""


def service_config_text(
    tmp_path: Path,
    *,
    broker_port: int,
    prefix: str,
    webhook_url: str | None = None,
    listen: str = "127.0.0.1:0",
    public_url: str | None = None,
    extra_aistudios: str = "",
    admin_token: str = "",
    first_poll_s: float = 0.2,
    poll_min_s: float = 0.05,
    download: bool = False,
    notify: bool = True,
    extra: str = "",
    route_extra: str = "",
) -> str:
    """A complete config for one test: fast timings, unique topics, every notify kind."""
    webhook = (
        f'\n[[notify]]\nname = "hook"\nkind = "webhook"\nurl = "{webhook_url}"\n'
        f'secret = "{WEBHOOK_SECRET}"\n'
        if webhook_url
        else ""
    )
    public = f'public_url = "{public_url}"' if public_url else ""
    targets = f"""
[[notify]]
name = "file"
kind = "file"
path = "{tmp_path / "videos.jsonl"}"

[[notify]]
name = "bus"
kind = "mqtt"
topic = "{prefix}/videos/{{route}}/{{job_id}}"
{webhook}"""
    return f"""
[service]
state_dir = "{tmp_path / "state"}"
log_level = "warning"
shutdown_grace_seconds = 5

[http]
listen = "{listen}"
admin_token = "{admin_token}"
{public}

[aistudios]
max_concurrent_exports = 8
max_requests_per_second = 200
poll_min_interval_seconds = {poll_min_s}
poll_max_interval_seconds = {max(1.0, poll_min_s)}
first_poll_seconds = {first_poll_s}
reconcile_wait_seconds = 0.3
{extra_aistudios}

[aistudios.simulator]
render_seconds = 0.4

[mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "{prefix}-ingress"

[[sources]]
name = "shop"
kind = "shopify"
secrets = ["{SHOPIFY_SECRET}"]

[[sources]]
name = "devices"
kind = "mqtt"
topic = "{prefix}/in/#"
dedupe_key = "id"

[[templates]]
name = "promo"
file = "{TEMPLATE}"

[[routes]]
name = "new-product"
source = "shop"
events = ["products/create"]
template = "promo"
download = {str(download).lower()}
{route_extra}
{PATCHES}
[[routes]]
name = "device-product"
source = "devices"
events = ["{prefix}/in/#"]
template = "promo"
{PATCHES}
{targets if notify else ""}
{extra}"""


def make_config(tmp_path: Path, **kwargs: Any) -> Config:
    """Write and load a test config."""
    path = tmp_path / "config.toml"
    path.write_text(service_config_text(tmp_path, **kwargs))
    return load_config(path, env={})


def unique_prefix() -> str:
    """Topics and client ids no other test (or earlier run) shares."""
    return f"sh-test-{uuid.uuid4().hex[:10]}"


def shopify_headers(body: bytes, webhook_id: str, topic: str = "products/create") -> dict[str, str]:
    """Headers of a genuine Shopify delivery of `body`."""
    digest = hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()
    return {
        "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
        "X-Shopify-Topic": topic,
        "X-Shopify-Webhook-Id": webhook_id,
        "Content-Type": "application/json",
    }


@asynccontextmanager
async def running_service(
    cfg: Config, knobs: SimulatorKnobs | None = None
) -> AsyncIterator[Running]:
    """The service in a task group; leaving the block is a graceful shutdown."""
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        running: Running = await tg.start(
            lambda task_status: run_service(
                cfg, shutdown=shutdown, simulator_knobs=knobs, task_status=task_status
            )
        )
        try:
            yield running
        finally:
            shutdown.set()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0, what: str = "condition"
) -> None:
    """Wait for state that other processes or loops produce (there is no event to await)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


class WebhookReceiver:
    """A customer's endpoint: verifies Standard Webhooks signatures and records deliveries."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.bad_signatures = 0
        self.arrived = anyio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        expected = sign_standard(
            WEBHOOK_SECRET, headers["webhook-id"], int(headers["webhook-timestamp"]), body
        )
        if expected not in headers["webhook-signature"].split():
            self.bad_signatures += 1
            return web.Response(status=401)
        self.deliveries.append((headers, body))
        self.arrived.set()
        self.arrived = anyio.Event()
        return web.Response(status=204)


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, WebhookReceiver]]:
    """A loopback HTTP endpoint for the webhook notify target."""
    receiver = WebhookReceiver()
    app = web.Application()
    app.router.add_post("/videos", receiver.handle)
    async with serve_app(app) as url:
        yield f"{url}/videos", receiver
