"""`received -> mapped`: turn a committed event into the exact export request of its job.

Runs after the ack, from the stored event, so it can be replayed after a crash or an
operator's retry and always produces the same body for the same config.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
import orjson

from service.aistudios.paid_requests import TEMPLATE_MODIFY_API
from service.catalog import Catalog
from service.config import Config
from service.intake import describe, route_context
from service.jobs.context import OutboxFor, end_with_error
from service.jobs.retry import mapped_export_name
from service.log import get_logger
from service.mapping.render import MappingError, evaluate
from service.mapping.routes import CompiledRoute, build_export, build_updates, export_name
from service.model import (
    API_LEGACY,
    API_V3,
    API_V3_ONE_STEP,
    Job,
    JobState,
    JobUpdate,
    RawEvent,
    StoredEvent,
)
from service.store.base import StaleTransitionError, Store

log = get_logger("prepare")

YIELD_EVERY = 64
"""Jobs mapped between two checkpoints: a large batch never holds the event loop for long."""


def raw_event_of(event: StoredEvent, source_kind: str) -> RawEvent:
    """Rebuild what the handler saw at intake from the inbox row."""
    payload = orjson.loads(event.body)
    topic = event.event_type if source_kind == "mqtt" else None
    return RawEvent(source=event.source, payload=payload, headers=event.headers, topic=topic)


def export_request(
    catalog: Catalog,
    route: CompiledRoute,
    context: dict[str, Any],
    export_name: str,
) -> tuple[str, dict[str, Any]]:
    """The flow and body of one job: v3 export, template/modify `updates`, or legacy `{scenes}`."""
    template_name = route.config.template
    template_id = catalog.server_templates.get(template_name)
    if template_id is not None:
        body = {
            "templateId": template_id,
            "name": export_name,
            "updates": build_updates(route, context),
        }
        return TEMPLATE_MODIFY_API, body
    patched = build_export(route, catalog.templates[template_name], context)
    if template_name in catalog.legacy:
        return API_LEGACY, {"scenes": patched["scenes"]}
    body = dict(patched)
    body["name"] = export_name
    return (API_V3_ONE_STEP if template_name in catalog.one_step else API_V3), body


def coalesce_key_for(route: CompiledRoute, context: dict[str, Any]) -> str | None:
    """`route:key` of a coalescing route for this event (the key is Jinja2), else None.

    Public so `studiohook preview` asks the store about exactly the key a job would carry.
    """
    if route.coalesce_key is None or route.config.coalesce_seconds <= 0:
        return None
    return f"{route.config.name}:{evaluate(route.coalesce_key, context)}"


@dataclass(frozen=True, slots=True)
class Mapped:
    """One job's mapping: the export call and body, its coalescing key and its export name."""

    api: str
    body: dict[str, Any]
    coalesce_key: str | None
    export_name: str

    def update(self) -> JobUpdate:
        """The `received -> mapped` update; the export name is committed with the body."""
        return JobUpdate(
            export_body=orjson.dumps(self.body), api=self.api, export_name=self.export_name
        )


def _rendered_name(route: CompiledRoute, context: dict[str, Any], job: Job) -> str:
    """The route's export name for this job; any error of the expression is a MappingError."""
    try:
        return export_name(route, context, job.job_id)
    except Exception as exc:  # a user expression on an event's data: any error is the event's
        why = str(exc) if isinstance(exc, MappingError) else describe(exc)
        raise MappingError(f"export_name: {why}") from exc


class Preparer:
    """Maps received jobs; a mapping error rejects the job with its reason (replayable)."""

    def __init__(self, cfg: Config, catalog: Catalog, store: Store, outbox_for: OutboxFor) -> None:
        self._cfg = cfg
        self._catalog = catalog
        self._store = store
        self._outbox_for = outbox_for

    def _coalesce_key(self, route: CompiledRoute, context: dict[str, Any]) -> str | None:
        return coalesce_key_for(route, context)

    def _body_for(self, job: Job, event: StoredEvent) -> Mapped:
        route = self._catalog.routes.get(job.route)
        source = self._cfg.source(event.source)
        if route is None or source is None:
            raise MappingError(
                f"route {job.route!r} or source {event.source!r} is no longer configured"
            )
        raw = raw_event_of(event, source.kind)
        handled = self._catalog.handled(route, source.kind, raw, None)
        context = route_context(
            handled,
            route=job.route,
            source=event.source,
            event_id=event.event_id,
            event_type=event.event_type,
        )
        name = mapped_export_name(job.export_name, lambda: _rendered_name(route, context, job))
        api, body = export_request(self._catalog, route, context, name)
        return Mapped(api, body, self._coalesce_key(route, context), name)

    async def _map_coalesced(self, job: Job, mapped: Mapped, coalesce_key: str) -> None:
        """Map the job to wait out its window; older waiting jobs of its key are superseded."""
        route = self._catalog.routes[job.route]
        update = replace(
            mapped.update(),
            coalesce_key=coalesce_key,
            next_attempt_at=time.time() + route.config.coalesce_seconds,
        )
        now = await self._store.map_coalesced(
            job.job_id, update, lambda superseded: self._outbox_for(superseded, "video.superseded")
        )
        if now.state is JobState.SUPERSEDED:
            log.info("job.superseded", job_id=job.job_id, by=now.superseded_by)

    def _body_for_row(self, job: Job, event: StoredEvent | None) -> Mapped:
        if event is None:
            raise MappingError(f"job {job.job_id} has no inbox event {job.event_row}")
        return self._body_for(job, event)

    async def _reject(self, job: Job, code: str, message: str) -> None:
        await end_with_error(
            self._store,
            self._outbox_for,
            job,
            {JobState.RECEIVED},
            JobState.REJECTED,
            code=code,
            message=message,
            now=time.time(),
        )

    async def prepare_many(self, jobs: Sequence[Job]) -> None:
        """Map a batch: one read of its events, the bodies in memory, ONE `mapped` commit.

        Per job, a mapping error rejects the job with its reason and a crash of the mapping
        code rejects it as `prepare_error`; neither stops the batch. Coalescing jobs are mapped
        one by one (each supersedes others under its key). A store outage raises and leaves
        the whole batch `received`, to be tried again.
        """
        events = await self._store.get_events({job.event_row for job in jobs})
        plain: list[tuple[str, JobUpdate]] = []
        coalescing: list[tuple[Job, Mapped, str]] = []
        rejected: list[tuple[Job, str, str]] = []
        for count, job in enumerate(jobs, start=1):
            if count % YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
            try:
                mapped = self._body_for_row(job, events.get(job.event_row))
            except (MappingError, ValueError, KeyError, TypeError) as exc:
                rejected.append((job, "mapping_error", str(exc) or type(exc).__name__))
            except Exception as exc:
                log.exception("job.prepare_crashed", job_id=job.job_id)
                rejected.append((job, "prepare_error", f"mapping crashed: {exc!r}"))
            else:
                if mapped.coalesce_key is None:
                    plain.append((job.job_id, mapped.update()))
                else:
                    coalescing.append((job, mapped, mapped.coalesce_key))
        await self._commit_batch(plain, coalescing, rejected)

    async def _commit_batch(
        self,
        plain: list[tuple[str, JobUpdate]],
        coalescing: list[tuple[Job, Mapped, str]],
        rejected: list[tuple[Job, str, str]],
    ) -> None:
        moved = await self._store.map_jobs(plain)
        if len(moved) < len(plain):
            log.info("jobs.prepare_raced", count=len(plain) - len(moved))
        for job, mapped, coalesce_key in coalescing:
            try:
                await self._map_coalesced(job, mapped, coalesce_key)
            except StaleTransitionError:
                log.info("job.prepare_raced", job_id=job.job_id)
        for job, code, message in rejected:
            await self._reject(job, code, message)

    async def __call__(self, job: Job) -> None:
        """Commit `mapped` with the export body, or `rejected` with the reason."""
        event = await self._store.get_event(job.event_row)
        if event is None:
            raise LookupError(f"job {job.job_id} has no inbox event {job.event_row}")
        try:
            mapped = self._body_for(job, event)
        except (MappingError, ValueError, KeyError, TypeError) as exc:
            await self._reject(job, "mapping_error", str(exc) or type(exc).__name__)
            return
        try:
            if mapped.coalesce_key is None:
                await self._store.transition(
                    job.job_id, {JobState.RECEIVED}, JobState.MAPPED, mapped.update()
                )
            else:
                await self._map_coalesced(job, mapped, mapped.coalesce_key)
        except StaleTransitionError:
            log.info("job.prepare_raced", job_id=job.job_id)
