"""Two real `studiohook serve` processes on one PostgreSQL database and one simulator.

Webhooks go to both; every delivery is also retried to the other instance, which must answer it
as a duplicate. One instance is killed with SIGKILL while it holds jobs in flight: the other
takes them over once their leases expire, and every event ends with exactly one billed export
and a `video.ready`.

The simulator holds every render short of done until the kill has landed: the dead instance
then holds renders, not announcements. (An announcement it had claimed would wait out the
outbox claim, 30 s by design, and the survivor's next idle scan; a job it had made ready is
announced by whichever sender takes the row, and is never claimed again, so it keeps its
owner.)
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon_fixtures import (
    Daemon,
    SimulatorProcess,
    post_delivery,
    ready_lines,
    shop_job_id,
    wait_until,
)
from tests.support.instance_fixtures import instance_config, jobs_by

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

LEASE_S = 3.0  # [service] lease_seconds: how long a dead instance's jobs wait
EVENTS_PER_INSTANCE = 10


def test_two_instances_share_intake_and_the_survivor_takes_over_after_a_kill_9(
    tmp_path: Path,
    postgres_url: str,
    daemon_factory: Callable[[str], Daemon],
    simulator_process: Callable[[float], SimulatorProcess],
) -> None:
    simulator = simulator_process(2.0)
    simulator.set_knobs(hold_renders=True)  # released once instance a is dead
    first = daemon_factory(
        instance_config(tmp_path, simulator.url, postgres_url, "a", lease_s=LEASE_S)
    )
    second = daemon_factory(
        instance_config(tmp_path, simulator.url, postgres_url, "b", lease_s=LEASE_S)
    )
    urls = {"a": first.start(), "b": second.start()}
    assert None not in urls.values()

    ids = [f"multi-{n}-{uuid.uuid4().hex[:8]}" for n in range(2 * EVENTS_PER_INSTANCE)]
    for n, webhook_id in enumerate(ids):
        to, retried_to = ("a", "b") if n % 2 == 0 else ("b", "a")
        assert post_delivery(str(urls[to]), webhook_id, f"Mug {n}") == 202
        assert post_delivery(str(urls[retried_to]), webhook_id, f"Mug {n}") == 200
    jobs = [shop_job_id(webhook_id) for webhook_id in ids]

    def a_holds_renders() -> bool:
        held = [s for s, owner in jobs_by(postgres_url).values() if owner == "a"]
        return "submitted" in held

    wait_until(a_holds_renders, what="instance a tracking a render", timeout_s=30)
    first.current.kill()
    killed_at = time.monotonic()
    simulator.set_knobs(hold_renders=False)
    at_kill = jobs_by(postgres_url)
    assert not {j for j, (s, _) in at_kill.items() if s in {"ready", "notified"}}, at_kill
    orphans = {j for j, (s, owner) in at_kill.items() if owner == "a"}
    assert orphans

    wait_until(
        lambda: {s for s, _ in jobs_by(postgres_url).values()} == {"notified"},
        what="every job notified by the survivor",
        timeout_s=LEASE_S + 40,
        explain=lambda: f"{jobs_by(postgres_url)}\n{second.current.tail()}",
    )
    taken_over_s = time.monotonic() - killed_at
    print(
        f"take-over: all of a's {len(orphans)} jobs notified {taken_over_s:.1f} s after its kill -9"
    )
    states = jobs_by(postgres_url)
    assert set(states) == set(jobs)
    assert all(states[j][1] == "b" for j in orphans), states
    assert simulator.exports_per_job(jobs) == dict.fromkeys(jobs, 1)
    announced = ready_lines(tmp_path / "videos.jsonl")
    print(f"video.ready lines per job: {sorted(set(announced.values()))}")
    assert all(announced.get(job, 0) >= 1 for job in jobs), announced
    assert taken_over_s < LEASE_S + 30, taken_over_s
    second.current.send(signal.SIGTERM)
    assert second.current.wait_exit() == 0
