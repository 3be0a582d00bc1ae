"""aiomqtt 2.x leaves a dropped connection's outcome unread; reading it is done here, once.

aiomqtt sets "Unexpected disconnection" on a future that only its message iterator or a
publish waiting at that moment reads. A connection that drops while nobody waits on it (the
notifier idle between announcements, a SIGTERM during a reconnect) kept it unread, and asyncio
logged "Future exception was never retrieved" when the client was collected. Both MQTT adapters
call `settle_outcomes` on a client they discard; why its connection ended is logged by them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt


def settle_outcomes(client: aiomqtt.Client) -> None:
    """Mark the client's connect/disconnect futures as read, now and whenever they settle."""
    for name in ("_connected", "_disconnected"):
        future = getattr(client, name, None)
        if not isinstance(future, asyncio.Future):
            continue
        if future.done():
            _read(future)
        else:
            future.add_done_callback(_read)


def _read(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
