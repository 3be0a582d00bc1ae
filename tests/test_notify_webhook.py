"""Webhook target against a real loopback receiver that verifies Standard Webhooks signatures."""

import socket
from contextlib import aclosing

import pytest

from service.config import NotifyConfig
from service.model import OutboxMessage
from service.notify.payload import ready_payload
from service.notify.sender import DeliveryError
from service.notify.webhook import WebhookNotifier, webhook_id
from tests.support.notify_fixtures import WEBHOOK_SECRET, ready_job

pytestmark = pytest.mark.anyio


ROUND_ONE = ready_job().export_name
ROUND_TWO = f"{ROUND_ONE}/r1700000060000"


def message(
    target: str = "crm", event_type: str = "video.ready", export_name: str = ROUND_ONE
) -> OutboxMessage:
    return OutboxMessage(
        id=1,
        job_id=ready_job().job_id,
        target=target,
        event_type=event_type,
        payload=ready_payload(ready_job(event_id="evt_1")),
        export_name=export_name,
    )


def notifier(url: str, clock=lambda: 1_700_000_000.0, secret=WEBHOOK_SECRET) -> WebhookNotifier:
    return WebhookNotifier(
        NotifyConfig(name="crm", kind="webhook", url=url, secret=secret), clock=clock
    )


async def test_delivers_a_signed_payload(webhook_receiver):
    async with aclosing(notifier(webhook_receiver.url)) as hook:
        await hook.deliver(message())
    [got] = webhook_receiver.received
    assert got.signature_ok
    assert got.body == message().payload
    assert got.timestamp == "1700000000"
    assert got.webhook_id == webhook_id(ready_job().job_id, ROUND_ONE, "video.ready", "crm")
    assert got.webhook_id.startswith("msg_")


async def test_retries_keep_the_id_and_sign_each_attempt_time(webhook_receiver):
    now = [1_700_000_000.0]
    webhook_receiver.answer(500)
    async with aclosing(notifier(webhook_receiver.url, clock=lambda: now[0])) as hook:
        with pytest.raises(DeliveryError) as failed:
            await hook.deliver(message())
        now[0] += 30
        await hook.deliver(message())
    assert not failed.value.permanent
    first, second = webhook_receiver.received
    assert first.webhook_id == second.webhook_id
    assert (first.timestamp, second.timestamp) == ("1700000000", "1700000030")
    assert first.signature_ok
    assert second.signature_ok


async def test_retries_of_a_round_keep_the_id_and_a_retried_job_gets_a_new_one(
    webhook_receiver,
):
    webhook_receiver.answer(503)
    async with aclosing(notifier(webhook_receiver.url)) as hook:
        with pytest.raises(DeliveryError):
            await hook.deliver(message(event_type="video.failed"))
        await hook.deliver(message(event_type="video.failed"))
        await hook.deliver(message(event_type="video.failed", export_name=ROUND_TWO))
    first, again, next_round = webhook_receiver.received
    assert first.webhook_id == again.webhook_id
    assert next_round.webhook_id != first.webhook_id
    assert next_round.webhook_id == webhook_id(ready_job().job_id, ROUND_TWO, "video.failed", "crm")
    assert all(r.signature_ok for r in webhook_receiver.received)


def test_webhook_id_differs_per_round_target_and_event_type():
    ids = {
        webhook_id("job_1", "sh-x", "video.ready", "a"),
        webhook_id("job_1", "sh-x", "video.ready", "b"),
        webhook_id("job_1", "sh-x", "video.failed", "a"),
        webhook_id("job_1", "sh-x/r1", "video.ready", "a"),
        webhook_id("job_2", "sh-x", "video.ready", "a"),
    }
    assert len(ids) == 5
    assert webhook_id("job_1", "sh-x", "video.ready", "a") == webhook_id(
        "job_1", "sh-x", "video.ready", "a"
    )


async def test_wrong_secret_fails_the_receivers_check(webhook_receiver):
    other = "whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldA=="
    async with aclosing(notifier(webhook_receiver.url, secret=other)) as hook:
        await hook.deliver(message())
    assert not webhook_receiver.received[0].signature_ok


async def test_gone_is_permanent(webhook_receiver):
    webhook_receiver.answer(410)
    async with aclosing(notifier(webhook_receiver.url)) as hook:
        with pytest.raises(DeliveryError) as failed:
            await hook.deliver(message())
    assert failed.value.permanent


async def test_too_many_requests_carries_retry_after(webhook_receiver):
    webhook_receiver.answer(429, {"Retry-After": "120"})
    async with aclosing(notifier(webhook_receiver.url)) as hook:
        with pytest.raises(DeliveryError) as failed:
            await hook.deliver(message())
    assert not failed.value.permanent
    assert failed.value.retry_after_s == 120.0
    assert failed.value.attempt_limit is None


async def test_other_client_errors_get_a_few_attempts(webhook_receiver):
    webhook_receiver.answer(400)
    async with aclosing(notifier(webhook_receiver.url)) as hook:
        with pytest.raises(DeliveryError) as failed:
            await hook.deliver(message())
    assert not failed.value.permanent
    assert failed.value.attempt_limit == 3


async def test_connection_refused_is_retryable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    async with aclosing(notifier(f"http://127.0.0.1:{closed_port}/hook")) as hook:
        with pytest.raises(DeliveryError) as failed:
            await hook.deliver(message())
    assert not failed.value.permanent
