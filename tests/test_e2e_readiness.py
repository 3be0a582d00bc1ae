"""/readyz names each part that is down: the MQTT broker and the AI Studios credentials.

The whole service runs in-process on a private broker, so the broker can be stopped and started
again under it. A positive API check is cached for 30 s, so the refused-credentials case starts
from a fresh service that never had one.
"""

import aiohttp
import anyio
import pytest

from service.aistudios.simulator import SimulatorKnobs
from tests.support.service_fixtures import eventually, make_config, running_service, unique_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def readiness(http, svc):
    async with http.get(f"{svc.http_url}/readyz") as response:
        return response.status, await response.json()


def ready_when(http, svc, expected_status, problems):
    """A check for `eventually`: /readyz answers `expected_status` naming exactly `problems`."""

    async def check():
        status, body = await readiness(http, svc)
        return status == expected_status and set(body.get("problems", {})) == problems

    return check


async def test_readyz_reports_the_broker_while_it_is_down_and_recovers_with_it(
    tmp_path, private_broker
):
    broker = private_broker()
    cfg = make_config(tmp_path, broker_port=broker.port, prefix=unique_prefix(), notify=False)
    async with running_service(cfg) as svc, aiohttp.ClientSession() as http:
        assert await readiness(http, svc) == (200, {"status": "ready", "roles": {"mqtt": "reader"}})

        await anyio.to_thread.run_sync(broker.stop)
        await eventually(ready_when(http, svc, 503, {"mqtt"}), what="/readyz naming mqtt")
        _, body = await readiness(http, svc)
        assert body == {
            "status": "not ready",
            "problems": {"mqtt": "MQTT broker not connected"},
            "roles": {"mqtt": "reader"},
        }

        await anyio.to_thread.run_sync(broker.start)
        await eventually(ready_when(http, svc, 200, set()), what="/readyz ready again")
        assert await readiness(http, svc) == (200, {"status": "ready", "roles": {"mqtt": "reader"}})


async def test_readyz_reports_refused_credentials_until_the_api_accepts_them(
    tmp_path, private_broker
):
    broker = private_broker()
    cfg = make_config(tmp_path, broker_port=broker.port, prefix=unique_prefix(), notify=False)
    knobs = SimulatorKnobs(render_seconds=0.4, api_keys=frozenset({"a-key-the-client-lacks"}))
    async with running_service(cfg, knobs) as svc, aiohttp.ClientSession() as http:
        status, body = await readiness(http, svc)
        assert status == 503
        assert body["problems"]["aistudios"] == "AI Studios refused the credentials"
        assert "store" not in body["problems"]

        assert svc.simulator is not None
        svc.simulator.knobs.api_keys = None  # the account accepts any key again
        await eventually(ready_when(http, svc, 200, set()), what="/readyz ready")
