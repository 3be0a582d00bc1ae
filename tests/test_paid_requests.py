"""What `preview` shows is byte for byte what the client sends, for each paid flow."""

import pytest
from aiohttp import web

from service.aistudios.client import AIStudiosClient
from service.aistudios.paid_requests import TEMPLATE_MODIFY_API, paid_request
from tests.support.aistudios_fixtures import v3_body
from tests.support.loopback import tiny_server

pytestmark = pytest.mark.anyio


async def sent_by_client(flow):
    received = []

    async def handler(request):
        received.append((request.method, str(request.url), await request.json()))
        return web.json_response({"success": True, "data": {"projectId": "p", "key": "k"}})

    async with (
        tiny_server(handler) as url,
        AIStudiosClient(base_url=url, legacy_base_url=url, api_key="k") as client,
    ):
        await flow(client)
    return url, received


@pytest.mark.parametrize("webhook", [None, "http://hooks.example/cb/j/t"])
async def test_v3_export(webhook):
    body = v3_body()
    url, received = await sent_by_client(
        lambda c: c.export_v3(body, name="n #j", webhook_url=webhook)
    )
    expected = paid_request(
        "v3", body, name="n #j", base_url=url, legacy_base_url=url, webhook_url=webhook
    )
    assert received == [(expected.method, expected.url, expected.body)]


async def test_legacy_export():
    body = {"scenes": [{"AIModel": {"script": "x"}, "clips": []}]}
    url, received = await sent_by_client(lambda c: c.export_legacy(body["scenes"]))
    expected = paid_request("legacy", body, name="ignored", base_url=url, legacy_base_url=url)
    assert received == [(expected.method, expected.url, expected.body)]


@pytest.mark.parametrize("webhook", [None, "http://hooks.example/cb/j/t"])
async def test_template_modify(webhook):
    body = {"templateId": "tpl", "name": "n #j", "updates": {"title": "T", "scripts_1": "S"}}
    url, received = await sent_by_client(
        lambda c: c.template_modify("tpl", body["updates"], name="n #j", webhook_url=webhook)
    )
    expected = paid_request(
        TEMPLATE_MODIFY_API, body, name="n #j", base_url=url, legacy_base_url=url,
        webhook_url=webhook,
    )  # fmt: skip
    assert received == [(expected.method, expected.url, expected.body)]
    assert expected.body["isExport"] is True
