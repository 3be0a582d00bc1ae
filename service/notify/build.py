"""Notify targets from config: one notifier per `[[notify]]` entry, closed on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from service.config import Config
from service.model import Job, NewOutboxMessage
from service.notify.file import FileNotifier
from service.notify.mqtt import MqttNotifier
from service.notify.payload import outbox_rows
from service.notify.sender import Notifier
from service.notify.webhook import WebhookNotifier


@asynccontextmanager
async def build_notifiers(cfg: Config) -> AsyncIterator[dict[str, Notifier]]:
    """Open every configured target; config validation guarantees each has what it needs."""
    async with AsyncExitStack() as stack:
        notifiers: dict[str, Notifier] = {}
        for target in cfg.notify:
            if target.kind == "webhook":
                notifiers[target.name] = await stack.enter_async_context(WebhookNotifier(target))
            elif target.kind == "mqtt" and cfg.mqtt is not None:
                notifiers[target.name] = await stack.enter_async_context(
                    MqttNotifier(target, cfg.mqtt)
                )
            elif target.kind == "file":
                notifiers[target.name] = FileNotifier(target)
        yield notifiers


def outbox_rows_for(cfg: Config, job: Job, event_type: str) -> Sequence[NewOutboxMessage]:
    """The rows a terminal transition inserts: one per target subscribed to the event."""
    return outbox_rows(job, event_type, cfg.notify)
