"""The intake: a verified delivery becomes an inbox row and its jobs, in one commit.

Each delivery is processed in isolation. Everything before the commit (the handler, the
dedupe expression, each route's handler and `when`) runs user code or user
expressions on input nobody controls, so `decide` catches whatever they raise and turns it
into a dead letter: the delivery is committed with the failing step and the exception, then
acknowledged like any other. Only a store that cannot commit makes `accept` raise (the
adapters answer 503 / withhold the PUBACK); a bad event never stops the daemon. Should the
store refuse one event's rows (a constraint, say), the delivery is kept as a dead letter of
step `commit` by its bytes, logged at error with the traceback: visible, replayable once fixed.

Both adapters (webhooks, MQTT) call `accept` and acknowledge only after it returned. Mapping
the template and rendering the export name happen later, in the job pipeline, so a slow or
failing template or name never delays an ack: a name that cannot be rendered rejects its job
at mapping, with the reason. `replay` runs a stored event through the configuration of the
day (after a fix) with the same `decide`, and never creates a job that already exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from handlers import handler_for
from service.catalog import Catalog
from service.config import SourceConfig
from service.ingress.dedupe import body_key, dedupe_key, event_id_for
from service.jobs.retry import retry_update
from service.log import get_logger
from service.mapping.routes import CompiledRoute, route_matches, should_run
from service.metrics import Metrics
from service.model import (
    Acceptance,
    EventStatus,
    HandledEvent,
    InboundEvent,
    JobState,
    NewJob,
    RawEvent,
    Replay,
    ReplayedJob,
    StoredEvent,
    job_id_for,
)
from service.store.base import StaleTransitionError, Store, StoreUnavailableError

log = get_logger("intake")

MAX_REASON_CHARS = 2000
"""A dead letter's reason is kept whole up to this; an exception message can be megabytes."""

RERENDERABLE = frozenset({JobState.NOTIFIED, JobState.FAILED, JobState.REJECTED})
"""Job states a `--rerender` replay sends back for a new, paid round."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a delivery (or one of its routes) could not be used.

    `step` says where (`handler`, `dedupe_key`, `routes.NAME.when`, ...), `kind` the same
    without the route name (a bounded metric label), `reason` the exception type and message.
    """

    step: str
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What the configuration makes of one delivery, decided without I/O."""

    dedupe_key: str
    event_id: str
    event_type: str
    jobs: tuple[NewJob, ...]
    failures: tuple[Failure, ...]

    @property
    def reason(self) -> str | None:
        """Every failure, step by step; None when the delivery is usable."""
        return explain(self.failures) if self.failures else None

    @property
    def failed_step(self) -> str | None:
        """The first step that failed."""
        return self.failures[0].step if self.failures else None


def explain(failures: Sequence[Failure]) -> str:
    """The reason a dead letter keeps: each failing step with its exception."""
    return "; ".join(f"{f.step}: {f.reason}" for f in failures)


def describe(exc: BaseException) -> str:
    """`TypeError: message`, cut to MAX_REASON_CHARS; the message alone hides what failed."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - a user exception whose __str__ raises is still described
        text = f"{type(exc).__name__}: (message unavailable)"
    return text[:MAX_REASON_CHARS]


def route_context(
    handled: HandledEvent, *, route: str, source: str, event_id: str, event_type: str
) -> dict[str, object]:
    """The names a route's expressions see: the handler's context plus the event's identity."""
    context: dict[str, object] = dict(handled.context)
    context.update(route=route, source=source, event_id=event_id, event_type=event_type)
    return context


def _checked(handled: object) -> HandledEvent:
    """A handler's answer, or TypeError when it is not shaped like a HandledEvent."""
    if not isinstance(handled, HandledEvent):
        raise TypeError(f"handler returned {type(handled).__name__}, not a HandledEvent")
    for name in ("event_id", "event_type"):
        value = getattr(handled, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"handler returned a {type(value).__name__} {name}, not a string")
    if not isinstance(handled.context, Mapping):
        raise TypeError(f"handler returned a {type(handled.context).__name__} context")
    return handled


def _route_job(
    catalog: Catalog,
    route: CompiledRoute,
    *,
    source: SourceConfig,
    raw: RawEvent,
    handled: HandledEvent,
    job_id: str,
    identity: tuple[str, str],
) -> NewJob | Failure | None:
    """One route's job, None when its `when` says no, or the Failure of the step that raised."""
    name = route.config.name
    event_id, event_type = identity
    step = "route_handler"
    try:
        seen = catalog.handled(route, source.kind, raw, handled)
        if seen is not handled:  # the route's own handler: checked like the source's
            seen = _checked(seen)
        if route.when is None:  # no condition: no context to build for it
            return NewJob(job_id, name)
        context = route_context(
            seen, route=name, source=source.name, event_id=event_id, event_type=event_type
        )
        step = "when"
        if not should_run(route, context):
            return None
        return NewJob(job_id, name)
    except Exception as exc:  # noqa: BLE001 - user code and expressions: the event's fault
        label = "handler" if step == "route_handler" else step
        return Failure(f"routes.{name}.{label}", step, describe(exc))


def decide(
    catalog: Catalog,
    routes: Sequence[CompiledRoute],
    *,
    source: SourceConfig,
    raw: RawEvent,
    body: bytes,
) -> Decision:
    """Handler, dedupe key and routes for one delivery; never raises for any input.

    A failing handler or dedupe expression leaves the delivery without a trustworthy identity,
    so it becomes a dead letter keyed by its bytes and no route runs. A failing route fails
    only itself: the other routes' jobs are made, and the failure makes the event a dead
    letter too, so replaying it after a fix adds just the missing job.
    """
    # The bytes' hash is the key only when the handler or the dedupe expression fails: it is
    # computed then, not per delivery (hashing a body over 2 KB also hands the GIL over).
    fallback_type = raw.topic or "unknown"
    try:
        handled = _checked(handler_for(source.kind)(raw))
    except Exception as exc:  # noqa: BLE001 - any payload shape can break a handler
        failure = Failure("handler", "handler", describe(exc))
        fallback_key = body_key(body, raw.topic)
        return Decision(
            fallback_key, event_id_for(None, fallback_key), fallback_type, (), (failure,)
        )
    try:
        key = dedupe_key(
            source,
            payload=raw.payload,
            headers=raw.headers,
            body=body,
            topic=raw.topic,
            handler_event_id=handled.event_id,
        )
    except Exception as exc:  # noqa: BLE001 - JMESPath raises type errors of its own
        failure = Failure("dedupe_key", "dedupe_key", describe(exc))
        fallback_key = body_key(body, raw.topic)
        event_id = event_id_for(None, fallback_key)
        return Decision(fallback_key, event_id, fallback_type, (), (failure,))
    event_id = event_id_for(handled.event_id, key)
    event_type = handled.event_type or raw.topic or "event"
    jobs: list[NewJob] = []
    failures: list[Failure] = []
    for route in routes:
        try:
            wanted = route_matches(route, source.name, event_type)
        except Exception as exc:  # noqa: BLE001 - an odd event type is the event's fault
            failures.append(Failure(f"routes.{route.config.name}.events", "events", describe(exc)))
            continue
        if not wanted:
            continue
        outcome = _route_job(
            catalog,
            route,
            source=source,
            raw=raw,
            handled=handled,
            job_id=job_id_for(source.name, key, route.config.name),
            identity=(event_id, event_type),
        )
        if isinstance(outcome, Failure):
            failures.append(outcome)
        elif outcome is not None:
            jobs.append(outcome)
    return Decision(key, event_id, event_type, tuple(jobs), tuple(failures))


def safe_text(value: str) -> str:
    """A header as storable UTF-8: undecodable bytes (surrogate escapes) become U+FFFD."""
    if value.isascii():
        return value  # the usual header: nothing to replace, no copy
    try:  # aiohttp keeps an undecodable byte as a surrogate escape: back to the byte, then FFFD
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return value.encode("utf-8", "replace").decode("utf-8")


def safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Every header name and value as storable UTF-8 (see `safe_text`), in a dict of its own.

    Its own, so a route handler that edits the headers it is given does not edit what is
    stored. The usual headers are all ASCII: they are copied as they are, not one by one.
    """
    if all(k.isascii() and v.isascii() for k, v in headers.items()):
        return dict(headers)
    return {safe_text(k): safe_text(v) for k, v in headers.items()}


SUMMARY_EVERY_S = 10.0
"""How often the intake writes its `intake summary` line at info (at most; only when busy)."""


class IntakeTally:
    """Counts deliveries by outcome and says, at most every SUMMARY_EVERY_S, how many there were.

    The per-delivery lines are at debug (their cost at info was a tenth of a webhook's CPU);
    this one line at info keeps the rate visible. It is written by the delivery that ends an
    interval, so a quiet intake writes nothing and needs no timer task.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._since = monotonic()
        self._counts: dict[str, int] = {"accepted": 0, "duplicate": 0, "dead_lettered": 0}

    def count(self, outcome: str) -> None:
        """Count one delivery; log the summary when the interval is over."""
        self._counts[outcome] += 1
        now = self._monotonic()
        if now - self._since >= SUMMARY_EVERY_S:
            log.info(
                "intake summary",
                seconds=round(now - self._since, 1),
                **self._counts,
            )
            self._since = now
            self._counts = dict.fromkeys(self._counts, 0)


def _raw_of(event: StoredEvent, source_kind: str) -> tuple[RawEvent | None, str | None]:
    """Rebuild what the handler saw at intake from an inbox row (topic = MQTT event type).

    Returns the reason instead when the body is not JSON (an unreadable MQTT payload).
    """
    topic = event.event_type if source_kind == "mqtt" else None
    try:
        payload: Any = orjson.loads(event.body)
    except orjson.JSONDecodeError as exc:
        return None, f"payload is not JSON: {exc}"
    return RawEvent(source=event.source, payload=payload, headers=event.headers, topic=topic), None


class StoreIntake:
    """The Intake port over a Store: decide, then one commit."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        *,
        on_new_jobs: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        sources: Sequence[SourceConfig] = (),
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._routes_by_source: dict[str, list[CompiledRoute]] = {}
        self._catalog = catalog
        for route in catalog.routes.values():
            self._routes_by_source.setdefault(route.config.source, []).append(route)
        self._on_new_jobs = on_new_jobs
        self._clock = clock
        self._sources = {s.name: s for s in sources}
        self._tally = IntakeTally()

    async def accept(self, source: SourceConfig, raw: RawEvent, body: bytes) -> Acceptance:
        """Decide and commit; duplicates come back with the original ids.

        Raises only StoreUnavailableError (nothing committed: do not acknowledge).
        """
        headers = safe_headers(raw.headers)
        if headers != raw.headers:
            raw = replace(raw, headers=headers)
        decision = decide(
            self._catalog,
            self._routes_by_source.get(source.name, []),
            source=source,
            raw=raw,
            body=body,
        )
        event = InboundEvent(
            source=source.name,
            dedupe_key=decision.dedupe_key,
            event_id=decision.event_id,
            event_type=decision.event_type,
            body=body,
            headers=headers,
            received_at=self._clock(),
            reason=decision.reason,
            failed_step=decision.failed_step,
        )
        failures = decision.failures
        try:
            acceptance = await self._store.accept_event(event, decision.jobs)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # the store refused this event's rows, not every event
            log.exception("event.commit_refused", source=source.name, event_id=event.event_id)
            failures = (*failures, Failure("commit", "commit", describe(exc)))
            key = body_key(body, raw.topic)
            refused = replace(
                event,
                dedupe_key=key,
                event_id=event_id_for(None, key),
                reason=explain(failures),
                failed_step="commit",
            )
            acceptance = await self._store.accept_event(refused, ())
        self._count(source.name, acceptance)
        if not acceptance.duplicate:
            self._report(source.name, acceptance.event_id, failures)
            if acceptance.job_ids:
                self._on_new_jobs()
        return acceptance

    async def dead_letter(
        self,
        source: SourceConfig,
        body: bytes,
        headers: Mapping[str, str],
        reason: str,
        topic: str | None = None,
    ) -> Acceptance:
        """Keep an unusable delivery (a payload that is not JSON) with its reason."""
        key = body_key(body, topic)
        event = InboundEvent(
            source=source.name,
            dedupe_key=key,
            event_id=event_id_for(None, key),
            event_type=topic or "unreadable",
            body=body,
            headers=safe_headers(headers),
            received_at=self._clock(),
            reason=reason[:MAX_REASON_CHARS],
            failed_step="payload",
        )
        acceptance = await self._store.accept_event(event, ())
        self._count(source.name, acceptance)
        if not acceptance.duplicate:
            self._report(source.name, acceptance.event_id, (Failure("payload", "payload", reason),))
        return acceptance

    async def replay(self, row: int, *, rerender: bool = False) -> Replay:
        """Run a stored event through the current configuration; LookupError if it is gone.

        A route whose job exists reports that job and costs nothing. With `rerender`, each
        existing job that has ended (notified, failed, rejected) starts a new round under a new
        export name: a new, paid video, so only on an operator's explicit request.
        """
        stored = await self._store.get_event(row)
        if stored is None:
            raise LookupError(f"no event {row}")
        source = self._sources.get(stored.source)
        if source is None:
            decided = replace(_as_inbound(stored), reason="source is no longer configured")
            return await self._store.replay_event(row, replace(decided, failed_step="source"), ())
        raw, unreadable = _raw_of(stored, source.kind)
        if raw is None:
            failure = unreadable or "payload is not JSON"
            decided = replace(_as_inbound(stored), reason=failure, failed_step="payload")
            return await self._store.replay_event(row, decided, ())
        decision = decide(
            self._catalog,
            self._routes_by_source.get(source.name, []),
            source=source,
            raw=raw,
            body=stored.body,
        )
        decided = replace(
            _as_inbound(stored),
            dedupe_key=decision.dedupe_key,
            event_id=decision.event_id,
            event_type=decision.event_type,
            reason=decision.reason,
            failed_step=decision.failed_step,
        )
        result = await self._store.replay_event(row, decided, decision.jobs)
        if rerender:
            result = replace(result, jobs=tuple([await self._rerender(j) for j in result.jobs]))
        created = [j.job_id for j in result.jobs if j.created or j.rerendered]
        log.info(
            "event.replayed",
            event_id=result.event.event_id,
            row=row,
            status=str(result.event.status),
            created=created,
            existing=[j.job_id for j in result.jobs if not (j.created or j.rerendered)],
            duplicate_of=result.duplicate_of,
        )
        if created:
            self._on_new_jobs()
        return result

    async def _rerender(self, replayed: ReplayedJob) -> ReplayedJob:
        if replayed.created or replayed.state not in RERENDERABLE:
            return replayed
        job = await self._store.get_job(replayed.job_id)
        if job is None or job.state not in RERENDERABLE:
            return replayed
        try:
            moved = await self._store.transition(
                job.job_id,
                RERENDERABLE,
                JobState.RECEIVED,
                replace(retry_update(job, self._clock()), note="re-render requested by operator"),
            )
        except StaleTransitionError:
            return replayed
        return replace(replayed, state=moved.state, rerendered=True)

    def _count(self, source: str, acceptance: Acceptance) -> None:
        if acceptance.duplicate:
            outcome = "duplicate"
        elif acceptance.status is EventStatus.DEAD_LETTERED:
            outcome = "dead_lettered"
        else:
            outcome = "accepted"
        self._tally.count(outcome)
        if self._metrics is not None:
            self._metrics.events.labels(source=source, outcome=outcome).inc()

    def _report(self, source: str, event_id: str, failures: Sequence[Failure]) -> None:
        """One warning per dead letter, with the event id; a counter per failing step."""
        if not failures:
            return
        if self._metrics is not None:
            for failure in failures:
                self._metrics.dead_letters.labels(source=source, step=failure.kind).inc()
        log.warning(
            "event.dead_lettered",
            source=source,
            event_id=event_id,
            step=failures[0].step,
            reason=explain(failures),
        )


def _as_inbound(stored: StoredEvent) -> InboundEvent:
    return InboundEvent(
        source=stored.source,
        dedupe_key=stored.dedupe_key,
        event_id=stored.event_id,
        event_type=stored.event_type,
        body=stored.body,
        headers=stored.headers,
        received_at=stored.received_at,
    )
