"""The intake port shared by the webhook and MQTT adapters.

Adapters verify and parse; the intake runs the handler, derives the dedupe key, matches routes
and commits event and jobs in one transaction. An adapter acknowledges (2xx, PUBACK) only after
`accept` or `dead_letter` returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import anyio.abc

from service.config import SourceConfig
from service.model import Acceptance, RawEvent


class Intake(Protocol):
    """Commits verified deliveries; raises StoreUnavailableError when it cannot."""

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        """Handle, route and commit one verified, parsed delivery (or recognise a duplicate)."""

    async def dead_letter(
        self,
        source: SourceConfig,
        body: bytes,
        headers: Mapping[str, str],
        reason: str,
        topic: str | None = None,
    ) -> Acceptance:
        """Commit a delivery that cannot be used (bad JSON on MQTT, say) with its reason."""


def started_once(task_status: anyio.abc.TaskStatus[None]) -> Callable[[], None]:
    """Report a long-lived task started the first time it is ready, and never again.

    An adapter becomes ready again after each reconnect or re-election; its starter waits only
    for the first time.
    """
    started = False

    def report() -> None:
        nonlocal started
        if not started:
            started = True
            task_status.started()

    return report
