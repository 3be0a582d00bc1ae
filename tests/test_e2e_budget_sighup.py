"""SIGHUP re-reads the spending caps in the real daemon: a bad file is refused, a raised cap
releases the held jobs oldest first, and nothing needs a restart."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon_fixtures import (
    Daemon,
    daemon_config,
    job_states,
    post_delivery,
    shop_job_id,
    wait_until,
)

pytestmark = pytest.mark.integration


def with_cap(text: str, per_day: str) -> str:
    return f"{text}\n[budget]\nexports_per_day = {per_day}\n"


def test_sighup_applies_a_raised_cap_and_refuses_a_broken_file(
    tmp_path: Path, daemon_factory: Callable[[str], Daemon]
) -> None:
    base = daemon_config(tmp_path, render_seconds=0.2)
    daemon = daemon_factory(with_cap(base, "1"))
    url = daemon.start()
    assert url is not None
    run = daemon.current
    ids = [f"hup-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
    for webhook_id in ids:
        assert post_delivery(url, webhook_id, f"Lamp {webhook_id}") == 202
    jobs = [shop_job_id(webhook_id) for webhook_id in ids]

    def states() -> list[str]:
        current = job_states(daemon.db_path)
        return [current.get(job, "") for job in jobs]

    wait_until(
        lambda: sorted(states()) == ["held", "held", "notified"],
        what="one job billed, two held",
        explain=run.tail,
    )
    held = [job for job, state in zip(jobs, states(), strict=True) if state == "held"]

    # A file with a problem changes nothing, and the log says why and what is kept.
    daemon.config_path.write_text(with_cap(base, "-3"))
    run.send(signal.SIGHUP)
    refused = run.wait_for(
        lambda r: r.get("event") == "budget.reload_refused", what="budget.reload_refused"
    )
    assert refused is not None
    assert "budget.exports_per_day" in refused["problems"]
    assert refused["kept"].startswith("day=1 ")
    assert sorted(states()) == ["held", "held", "notified"]

    # Room for one more: the older held job goes, the newer one still waits.
    daemon.config_path.write_text(with_cap(base, "2"))
    run.send(signal.SIGHUP)
    reloaded = run.wait_for(lambda r: r.get("event") == "budget.reloaded", what="budget.reloaded")
    assert reloaded is not None
    assert reloaded["caps"].startswith("day=2 ")
    released = run.wait_for(lambda r: r.get("event") == "budget.released", what="budget.released")
    assert released is not None
    assert (released["count"], released["still_held"]) == (1, 1)
    wait_until(
        lambda: job_states(daemon.db_path)[held[0]] == "notified",
        what="the older held job notified",
        explain=run.tail,
    )
    assert job_states(daemon.db_path)[held[1]] == "held"
    assert run.process.poll() is None
