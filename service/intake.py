"""The intake: a verified delivery becomes an inbox row and its jobs, in one commit.

Each delivery is logged once: by its adapter, with what it knows of the transport, except
when the intake itself dead-letters it (only the intake knows that reason).

Both adapters (webhooks, MQTT) call `accept` and acknowledge only after it returned. Everything
before the commit is pure and fast (handler, dedupe key, route matching); mapping the template
happens later, in the job pipeline, so a slow or failing template never delays an ack.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from handlers import HandlerError, handler_for
from service.catalog import Catalog
from service.config import SourceConfig
from service.ingress.dedupe import DedupeKeyError, body_key, dedupe_key, event_id_for
from service.log import get_logger
from service.mapping.render import MappingError
from service.mapping.routes import CompiledRoute, export_name, route_matches, should_run
from service.metrics import Metrics
from service.model import (
    Acceptance,
    HandledEvent,
    InboundEvent,
    JobState,
    NewJob,
    RawEvent,
    job_id_for,
)
from service.store.base import Store

log = get_logger("intake")


def route_context(
    handled: HandledEvent, *, route: str, source: str, event_id: str, event_type: str
) -> dict[str, object]:
    """The names a route's expressions see: the handler's context plus the event's identity."""
    context: dict[str, object] = dict(handled.context)
    context.update(route=route, source=source, event_id=event_id, event_type=event_type)
    return context


def decide_jobs(
    catalog: Catalog,
    routes: Sequence[CompiledRoute],
    *,
    source: SourceConfig,
    raw: RawEvent,
    handled: HandledEvent,
    dedupe: str,
    event_id: str,
    event_type: str,
) -> tuple[NewJob, ...]:
    """Match routes and name each job; a route whose `when` or name fails becomes a rejected job.

    Each route sees the event through its own handler when it names one, exactly as the
    mapping will later, so `when` and the export name never disagree with the patches.
    """
    jobs: list[NewJob] = []
    for route in routes:
        name = route.config.name
        if not route_matches(route, source.name, event_type):
            continue
        job_id = job_id_for(source.name, dedupe, name)
        try:
            context = route_context(
                catalog.handled(route, source.kind, raw, handled),
                route=name,
                source=source.name,
                event_id=event_id,
                event_type=event_type,
            )
            if not should_run(route, context):
                continue
            jobs.append(NewJob(job_id, name, export_name(route, context, job_id)))
        except (MappingError, HandlerError) as exc:
            jobs.append(
                NewJob(
                    job_id,
                    name,
                    f"{name} #{job_id}",
                    state=JobState.REJECTED,
                    error_code="mapping_error",
                    error_message=str(exc),
                )
            )
    return tuple(jobs)


class StoreIntake:
    """The Intake port over a Store: handler, dedupe, routing, one commit."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        *,
        on_new_jobs: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._routes_by_source: dict[str, list[CompiledRoute]] = {}
        self._catalog = catalog
        for route in catalog.routes.values():
            self._routes_by_source.setdefault(route.config.source, []).append(route)
        self._on_new_jobs = on_new_jobs
        self._clock = clock

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        """Handle, route and commit; duplicates come back with the original ids."""
        try:
            handled = handler_for(source.kind)(raw)
            key = dedupe_key(
                source,
                payload=raw.payload,
                headers=raw.headers,
                body=body,
                topic=raw.topic,
                handler_event_id=handled.event_id,
            )
        except (HandlerError, DedupeKeyError) as exc:
            acceptance = await self.dead_letter(source, body, raw.headers, str(exc), raw.topic)
            log.warning(
                "event.dead_lettered",
                source=source.name,
                event_id=acceptance.event_id,
                reason=str(exc),
            )
            return acceptance
        event_id = event_id_for(handled.event_id, key)
        event_type = handled.event_type or raw.topic or "event"
        jobs = decide_jobs(
            self._catalog,
            self._routes_by_source.get(source.name, []),
            source=source,
            raw=raw,
            handled=handled,
            dedupe=key,
            event_id=event_id,
            event_type=event_type,
        )
        event = InboundEvent(
            source=source.name,
            dedupe_key=key,
            event_id=event_id,
            event_type=event_type,
            body=body,
            headers=dict(raw.headers),
            received_at=self._clock(),
        )
        acceptance = await self._store.accept_event(event, jobs)
        self._count(source.name, "duplicate" if acceptance.duplicate else "accepted")
        if acceptance.job_ids and not acceptance.duplicate:
            self._on_new_jobs()
        return acceptance

    def _count(self, source: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.events.labels(source=source, outcome=outcome).inc()

    async def dead_letter(
        self,
        source: SourceConfig,
        body: bytes,
        headers: Mapping[str, str],
        reason: str,
        topic: str | None = None,
    ) -> Acceptance:
        """Keep an unusable delivery with its reason, deduplicated like any other."""
        key = body_key(body, topic)
        event = InboundEvent(
            source=source.name,
            dedupe_key=key,
            event_id=event_id_for(None, key),
            event_type=topic or "unreadable",
            body=body,
            headers=dict(headers),
            received_at=self._clock(),
        )
        acceptance = await self._store.reject_event(event, reason)
        self._count(source.name, "rejected")
        return acceptance
