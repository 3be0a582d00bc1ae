"""/metrics of several instances: every series names its instance, store-wide gauges say so."""

from __future__ import annotations

import socket

from service.jobs.budget import PeriodReport
from service.metrics import INSTANCE_LABEL, Metrics
from service.model import JobState
from tests.support.metrics_text import parse

STORE_WIDE = {
    "studiohook_jobs",
    "studiohook_outbox_backlog",
    "studiohook_budget_spent",
    "studiohook_budget_remaining",
}


def busy_metrics(instance: str | None) -> Metrics:
    metrics = Metrics(instance)
    metrics.events.labels(source="shop", outcome="accepted").inc()
    metrics.dead_letters.labels(source="shop", step="payload").inc()
    metrics.on_api_call("v3.project_export", "ok")
    metrics.cache_hits.labels(route="r").inc()
    metrics.polls_per_job.observe(3)
    metrics.set_job_counts({JobState.READY: 2})
    metrics.set_budget([PeriodReport(scope="day", period="2026-12-01", limit=5, spent=1)])
    metrics.outbox_backlog.set(7)
    return metrics


def test_every_series_carries_the_instance_id() -> None:
    series, helps = parse(busy_metrics("worker-a").render().decode())
    assert set(helps) >= STORE_WIDE | {"studiohook_events", "studiohook_exports_submitted"}
    assert series
    assert {dict(labels).get(INSTANCE_LABEL) for _, labels in series} == {"worker-a"}
    assert series[("studiohook_exports_submitted_total", frozenset({(INSTANCE_LABEL, "worker-a")}))]


def test_the_instance_id_defaults_to_the_host_name_as_job_claims_do() -> None:
    series, _ = parse(busy_metrics(None).render().decode())
    assert {dict(labels)[INSTANCE_LABEL] for _, labels in series} == {socket.gethostname()}


def test_gauges_read_from_the_store_say_they_are_database_wide() -> None:
    _, helps = parse(Metrics("a").render().decode())
    for name, text in helps.items():
        assert ("Database-wide" in text) == (name in STORE_WIDE), (name, text)
