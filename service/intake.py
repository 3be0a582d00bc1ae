"""The intake: a verified delivery becomes an inbox row and its jobs, in one commit.

Both adapters (webhooks, MQTT) call `accept` and acknowledge only after it returned. Everything
before the commit is pure and fast (handler, dedupe key, route matching); mapping the template
happens later, in the job pipeline, so a slow or failing template never delays an ack.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from handlers import REGISTRY
from handlers.base import HandlerError
from service.config import SourceConfig
from service.ingress.dedupe import DedupeKeyError, dedupe_key, event_id_for
from service.log import get_logger
from service.mapping.render import MappingError, evaluate_condition
from service.mapping.routes import CompiledRoute, export_name, route_matches
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

Handler = Callable[[RawEvent], HandledEvent]


def handler_for(kind: str) -> Handler:
    """The built-in handler of a source kind (the generic JSON one when it has none)."""
    return REGISTRY.get(kind) or REGISTRY["json"]


def route_context(
    handled: HandledEvent, *, route: str, source: str, event_id: str, event_type: str
) -> dict[str, object]:
    """The names a route's expressions see: the handler's context plus the event's identity."""
    context: dict[str, object] = dict(handled.context)
    context.update(route=route, source=source, event_id=event_id, event_type=event_type)
    return context


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """The jobs an event produces; pure, so it is tested without a store."""

    jobs: tuple[NewJob, ...]


def decide_jobs(
    routes: Sequence[CompiledRoute],
    *,
    source: str,
    dedupe: str,
    event_id: str,
    event_type: str,
    handled: HandledEvent,
) -> RoutingDecision:
    """Match routes and name each job; a route whose `when` or name fails becomes a rejected job."""
    jobs: list[NewJob] = []
    for route in routes:
        name = route.config.name
        if not route_matches(route, source, event_type):
            continue
        job_id = job_id_for(source, dedupe, name)
        context = route_context(
            handled, route=name, source=source, event_id=event_id, event_type=event_type
        )
        try:
            if route.when is not None and not evaluate_condition(route.when, context):
                continue
            jobs.append(NewJob(job_id, name, export_name(route, context, job_id)))
        except MappingError as exc:
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
    return RoutingDecision(tuple(jobs))


class StoreIntake:
    """The Intake port over a Store: handler, dedupe, routing, one commit."""

    def __init__(
        self,
        store: Store,
        routes: Mapping[str, CompiledRoute],
        *,
        on_new_jobs: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._routes_by_source: dict[str, list[CompiledRoute]] = {}
        for route in routes.values():
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
            return await self.dead_letter(source, body, raw.headers, str(exc), raw.topic)
        event_id = event_id_for(handled.event_id, key)
        event_type = handled.event_type or raw.topic or "event"
        decision = decide_jobs(
            self._routes_by_source.get(source.name, []),
            source=source.name,
            dedupe=key,
            event_id=event_id,
            event_type=event_type,
            handled=handled,
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
        acceptance = await self._store.accept_event(event, decision.jobs)
        self._count(source.name, "duplicate" if acceptance.duplicate else "accepted")
        log.info(
            "event.duplicate" if acceptance.duplicate else "event.accepted",
            source=source.name,
            event_id=acceptance.event_id,
            event_type=event_type,
            jobs=list(acceptance.job_ids),
        )
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
        digest = hashlib.sha256((topic or "").encode() + b"\x00" + body).hexdigest()
        key = f"b:{digest}"
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
        log.warning(
            "event.dead_lettered", source=source.name, event_id=acceptance.event_id, reason=reason
        )
        return acceptance
