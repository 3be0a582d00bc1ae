"""Notify targets from config: one notifier per `[[notify]]` entry, closed on shutdown."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager

import aiohttp
import orjson

from service.config import Config, NotifyConfig
from service.model import Job, NewOutboxMessage, OutboxMessage
from service.notify.download import DOWNLOAD_TIMEOUT, allowed_download_hosts
from service.notify.file import FileNotifier
from service.notify.local_copy import LocalCopy, WithLocalCopy
from service.notify.mqtt import MqttNotifier
from service.notify.payload import outbox_rows
from service.notify.sender import Notifier
from service.notify.webhook import WebhookNotifier
from service.store.base import Store


def _copy_wanted(cfg: Config, target: NotifyConfig) -> Callable[[OutboxMessage], bool] | None:
    """Which of this target's messages carry a local copy: all (target flag) or by route."""
    if target.download:
        return lambda _message: True
    routes = frozenset(r.name for r in cfg.routes if r.download)
    if not routes:
        return None
    return lambda message: orjson.loads(message.payload).get("route") in routes


@asynccontextmanager
async def build_notifiers(
    cfg: Config, store: Store, api_urls: Sequence[str]
) -> AsyncIterator[dict[str, Notifier]]:
    """Open every configured target; config validation guarantees each has what it needs.

    `api_urls` are the API's base URLs in use (the simulator's, when it stands in): videos are
    only downloaded from their hosts and the configured `download_hosts`.
    """
    async with AsyncExitStack() as stack:
        copy: LocalCopy | None = None
        notifiers: dict[str, Notifier] = {}
        for target in cfg.notify:
            notifier: Notifier
            if target.kind == "webhook":
                notifier = await stack.enter_async_context(aclosing(WebhookNotifier(target)))
            elif target.kind == "mqtt" and cfg.mqtt is not None:
                mqtt = MqttNotifier(target, cfg.mqtt, instance=cfg.service.instance_id)
                notifier = await stack.enter_async_context(aclosing(mqtt))
            else:
                notifier = FileNotifier(target)
            wanted = _copy_wanted(cfg, target)
            if wanted is not None:
                if copy is None:
                    session = await stack.enter_async_context(
                        aiohttp.ClientSession(timeout=DOWNLOAD_TIMEOUT)
                    )
                    copy = LocalCopy(
                        store,
                        session,
                        cfg.service.state_dir / "videos",
                        allowed_download_hosts(
                            dataclasses.replace(
                                cfg.aistudios, base_url=api_urls[0], legacy_base_url=api_urls[-1]
                            )
                        ),
                    )
                notifier = WithLocalCopy(notifier, copy, wanted)
            notifiers[target.name] = notifier
        yield notifiers


def outbox_rows_for(cfg: Config, job: Job, event_type: str) -> Sequence[NewOutboxMessage]:
    """The rows a terminal transition inserts: one per target subscribed to the event."""
    return outbox_rows(job, event_type, cfg.notify)
