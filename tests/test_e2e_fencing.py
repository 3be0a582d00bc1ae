"""Fencing with real processes: an instance that lost its lease cannot move the jobs it lost.

Two real `studiohook serve` processes share one PostgreSQL database and one simulator whose
renders are slow. Instance `a` is frozen with SIGSTOP while it tracks renders, so it stops
renewing its leases; once they expire `b` claims the jobs (each claim bumps the job's fence).
Then `a` is thawed with SIGCONT: its timers are overdue, so it polls at once and tries to commit
what it read. Every such write names the fence it held before the freeze and is refused; only
`b` moves those jobs from then on, each is billed once and announced once. Their /metrics
then show each instance's own id on every series, the same database-wide job counts, and
each instance's own export counter.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from service.metrics import INSTANCE_LABEL
from tests.support.daemon_fixtures import (
    Daemon,
    SimulatorProcess,
    post_delivery,
    ready_lines,
    shop_job_id,
    wait_until,
)
from tests.support.instance_fixtures import (
    announcements_of,
    fences_of,
    instance_config,
    jobs_by,
    transitions_of,
)
from tests.support.metrics_text import scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LEASE_S = 2.0
RENDER_S = 5.0  # long enough that `b` is still tracking when `a` thaws (~3 s in)
EVENTS = 6


def test_an_instance_thawed_after_its_leases_expired_cannot_move_the_jobs_taken_over(
    tmp_path: Path,
    postgres_url: str,
    daemon_factory: Callable[[str], Daemon],
    simulator_process: Callable[[float], SimulatorProcess],
) -> None:
    simulator = simulator_process(RENDER_S)
    first = daemon_factory(
        instance_config(
            tmp_path,
            simulator.url,
            postgres_url,
            "a",
            lease_s=LEASE_S,
            max_concurrent_exports=EVENTS,
        )
    )
    url_a = first.start()
    assert url_a is not None
    started_at = time.time()
    ids = [f"fence-{n}-{uuid.uuid4().hex[:8]}" for n in range(EVENTS)]
    for n, webhook_id in enumerate(ids):
        assert post_delivery(url_a, webhook_id, f"Lamp {n}") == 202
    jobs = [shop_job_id(webhook_id) for webhook_id in ids]

    def a_tracks_renders() -> bool:
        states = jobs_by(postgres_url)
        return len(states) == EVENTS and all(
            s == "submitted" and owner == "a" for s, owner in states.values()
        )

    wait_until(
        a_tracks_renders,
        what="instance a tracking every render",
        timeout_s=10,
        explain=lambda: f"{jobs_by(postgres_url)}\n{first.current.tail()}",
    )
    fences_before = fences_of(postgres_url)
    first.current.send(signal.SIGSTOP)
    frozen_at = time.time()
    # b starts while a is frozen: its start-up overlaps the leases running out.
    second = daemon_factory(
        instance_config(
            tmp_path,
            simulator.url,
            postgres_url,
            "b",
            lease_s=LEASE_S,
            max_concurrent_exports=EVENTS,
        )
    )
    url_b = second.start()
    assert url_b is not None
    wait_until(
        lambda: all(owner == "b" for _, owner in jobs_by(postgres_url).values()),
        what="instance b claiming a's jobs once their leases expired",
        timeout_s=LEASE_S + 5,
        explain=lambda: f"{jobs_by(postgres_url)}\n{second.current.tail()}",
    )
    first.current.send(signal.SIGCONT)
    thawed_at = time.time()
    print(
        f"a froze {frozen_at - started_at:.1f} s after the first webhook; b took its jobs over"
        f" {thawed_at - frozen_at:.1f} s later; a thawed {thawed_at - started_at:.1f} s in"
    )
    assert {s for s, _ in jobs_by(postgres_url).values()} == {"submitted"}, "b finished too soon"
    assert all(fences_of(postgres_url)[j] > fences_before[j] for j in jobs)

    def lost_every_claim() -> bool:
        return {r.get("job_id") for r in first.current.events("job.claim_lost")} == set(jobs)

    wait_until(
        lost_every_claim,
        what="instance a refused on every job it lost",
        timeout_s=10,
        explain=first.current.tail,
    )
    wait_until(
        lambda: {s for s, _ in jobs_by(postgres_url).values()} == {"notified"},
        what="every job notified by b",
        timeout_s=RENDER_S + 10,
        explain=lambda: (
            f"{jobs_by(postgres_url)}\nb:\n{second.current.tail()}\na:\n{first.current.tail()}"
        ),
    )

    states = jobs_by(postgres_url)
    assert {owner for _, owner in states.values()} == {"b"}
    for refused in ("job.ready", "job.failed", "job.poll_crashed"):
        assert not first.current.events(refused), f"a logged {refused} on a job it lost"
    assert {r.get("job_id") for r in second.current.events("job.ready")} == set(jobs)
    after = [t for t in transitions_of(postgres_url) if t[3] >= frozen_at]
    moves = {(job, before, to) for job, before, to, _ in after}
    assert moves == {(j, "submitted", "ready") for j in jobs} | {
        (j, "ready", "notified") for j in jobs
    }, after
    assert len(after) == 2 * EVENTS, after
    assert simulator.exports_per_job(jobs) == dict.fromkeys(jobs, 1)
    assert announcements_of(postgres_url, "video.ready") == dict.fromkeys(jobs, 1)
    assert ready_lines(tmp_path / "videos.jsonl") == dict.fromkeys(jobs, 1)
    assert_metrics_per_instance({"a": url_a, "b": url_b})
    for daemon in (first, second):
        daemon.current.send(signal.SIGTERM)
        assert daemon.current.wait_exit() == 0


def assert_metrics_per_instance(urls: dict[str, str]) -> None:
    """Each instance labels its series with its own id; store-read gauges agree, counters not.

    `a` sent every export before it froze, so the export counters differ, while both read the
    same database for the jobs by state.
    """
    scraped = {name: scrape(url)[0] for name, url in urls.items()}
    for name, series in scraped.items():
        assert {dict(labels).get(INSTANCE_LABEL) for _, labels in series} == {name}
    notified = {n: value(s, "studiohook_jobs", state="notified") for n, s in scraped.items()}
    assert notified == {"a": EVENTS, "b": EVENTS}
    exports = {n: value(s, "studiohook_exports_submitted_total") for n, s in scraped.items()}
    assert exports == {"a": EVENTS, "b": 0}
