"""Prometheus metrics, one registry per running service so tests can run several side by side.

Every series carries the constant label `instance_id`: the instance's owner id (`[service]
instance`, else the host name), the one its job claims carry. Several instances behind one
load balancer, or scraped through one federation, so stay apart. The label is not called
`instance` because Prometheus sets that one itself, to the scraped address, and would rename
ours `exported_instance`.

Two kinds of figures share the page. Counters and histograms are this process's own. The
gauges read from the store at scrape time (`studiohook_jobs`, `studiohook_outbox_backlog`,
`studiohook_budget_*`) are database-wide: instances sharing one PostgreSQL database all report
the same figure, so they are aggregated with `max`, never `sum`; their help text says so.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from service.model import Job, JobState

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from prometheus_client.metrics_core import Metric

    from service.jobs.budget import PeriodReport

INSTANCE_LABEL = "instance_id"
_STORE_WIDE = (
    "Database-wide, read from the store at scrape time: every instance sharing the store"
    " reports the same figure (aggregate with max, not sum)."
)


class _ConstantLabels(Collector):
    """Every family of `inner` with `labels` added to each sample (first, so they read first)."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]) -> None:
        self._inner = inner
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            family.samples = [
                sample._replace(labels={**self._labels, **sample.labels})
                for sample in family.samples
            ]
            yield family


_RENDER_BUCKETS_S = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_LAG_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """Every figure an operator needs to see intake, spend and delivery at a glance."""

    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance or socket.gethostname()
        r = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry()
        """What /metrics exposes: every series of the metrics below, with `instance_id`."""
        self.registry.register(_ConstantLabels(r, {INSTANCE_LABEL: self.instance}))
        self.events = Counter(
            "studiohook_events_total",
            "Deliveries by source and outcome (accepted, duplicate, dead_lettered).",
            ["source", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "studiohook_dead_letters_total",
            "Dead-lettered deliveries by source and the step that failed (handler, dedupe_key,"
            " when, route_handler, events, payload, commit).",
            ["source", "step"],
            registry=r,
        )
        self.jobs = Gauge("studiohook_jobs", f"Jobs by state. {_STORE_WIDE}", ["state"], registry=r)
        self.exports = Counter(
            "studiohook_exports_submitted_total",
            "Paid export requests this instance sent.",
            registry=r,
        )
        self.api_calls = Counter(
            "studiohook_api_calls_total",
            "AI Studios calls by endpoint and outcome class.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.polls_per_job = Histogram(
            "studiohook_polls_per_job",
            "Progress polls a render cost until it ended.",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50),
            registry=r,
        )
        self.render_seconds = Histogram(
            "studiohook_render_seconds",
            "Submit to ready.",
            buckets=_RENDER_BUCKETS_S,
            registry=r,
        )
        self.detection_lag_seconds = Histogram(
            "studiohook_detection_lag_seconds",
            "Callback arrival to confirmed ready (only where a callback came first).",
            buckets=_LAG_BUCKETS_S,
            registry=r,
        )
        self.cache_hits = Counter(
            "studiohook_cache_hits_total",
            "Jobs completed with an identical earlier video instead of a paid export.",
            ["route"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "studiohook_budget_spent",
            "Billed exports recorded in the current period (scope: day, month, route:NAME)."
            f" {_STORE_WIDE}",
            ["scope"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "studiohook_budget_remaining",
            "Exports the spending cap still allows in the current period (capped scopes only)."
            f" {_STORE_WIDE}",
            ["scope"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "studiohook_outbox_backlog",
            f"Outbox messages not yet delivered. {_STORE_WIDE}",
            registry=r,
        )

    def set_job_counts(self, counts: dict[JobState, int]) -> None:
        """Refresh the per-state gauge; every state is exported, zero included."""
        for state in JobState:
            self.jobs.labels(state=state.value).set(counts.get(state, 0))

    def set_budget(self, lines: Sequence[PeriodReport]) -> None:
        """Refresh the spending figures of each period (read from the store at scrape time)."""
        for line in lines:
            self.budget_spent.labels(scope=line.scope).set(line.spent)
            if line.remaining is not None:
                self.budget_remaining.labels(scope=line.scope).set(line.remaining)

    def observe_ready(self, job: Job, callback_at: float | None) -> None:
        """Record a render's cost and timing as it becomes ready."""
        self.polls_per_job.observe(job.polls)
        if job.ready_at is not None and job.submitted_at is not None:
            self.render_seconds.observe(max(0.0, job.ready_at - job.submitted_at))
        if job.ready_at is not None and callback_at is not None:
            self.detection_lag_seconds.observe(max(0.0, job.ready_at - callback_at))

    def on_api_call(self, endpoint: str, outcome: str) -> None:
        """The client's `on_call` hook."""
        self.api_calls.labels(endpoint=endpoint, outcome=outcome).inc()
        if outcome == "ok" and endpoint.endswith("export"):
            self.exports.inc()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
