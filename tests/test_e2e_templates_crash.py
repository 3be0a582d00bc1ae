"""kill -9 in the paid call's window of each template flow: one billed export per job.

The daemon runs as a real process on real SQLite, against a simulator in its own process (so
renders go on while the daemon is dead). It is killed the moment it logs that it is about to
POST (`submitting` is committed, the request may or may not leave) and the moment the
simulator logs that it created the billed project of the second job (before the daemon could
record the id). The restart that waits for that line may first export the first job again
(when its POST never left); that export's line names the first job, so it kills nothing.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from service.aistudios.simulator_v3 import SAMPLE_PROJECT_ID, SAMPLE_TEMPLATE_ID
from tests.support.daemon_fixtures import (
    TEMPLATE,
    Daemon,
    SimulatorProcess,
    daemon_config,
    job_states,
    post_delivery,
    ready_lines,
    shop_job_id,
    wait_until,
)

pytestmark = pytest.mark.integration

FILE_TEMPLATE = f'file = "{TEMPLATE}"'
FILE_PATCH = '"scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org" = "Meet {{ product.title }}."'
FLOWS = {
    "saved-project": (
        f'project_id = "{SAMPLE_PROJECT_ID}"\napi = "v3"',
        '"scenes[*].clips[tag=title].text" = "Meet {{ product.title }}."',
    ),
    "server-template": (
        f'template_id = "{SAMPLE_TEMPLATE_ID}"',
        'title = "Meet {{ product.title }}."',
    ),
}


def flow_config(tmp_path: Path, api_url: str, flow: str) -> str:
    template, patch = FLOWS[flow]
    text = daemon_config(tmp_path, api_url=api_url, max_concurrent_exports=2)
    assert FILE_TEMPLATE in text
    assert FILE_PATCH in text
    return text.replace(FILE_TEMPLATE, template).replace(FILE_PATCH, patch)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_killed_in_the_paid_call_window_each_job_is_exported_once(
    tmp_path: Path,
    flow: str,
    daemon_factory: Callable[[str], Daemon],
    simulator_process: Callable[[float], SimulatorProcess],
) -> None:
    simulator = simulator_process(0.5)
    daemon = daemon_factory(flow_config(tmp_path, simulator.url, flow))
    ids = [f"{flow}-{i}-{uuid.uuid4().hex[:8]}" for i in range(2)]
    jobs = [shop_job_id(i) for i in ids]
    landed = "simulator_export"
    for webhook_id, moment in zip(ids, ("job.exporting", landed), strict=True):
        if moment == landed:
            # The export's name ends with " #<job id>": this job's billed create, no other.
            this_export = f"#{shop_job_id(webhook_id)}"
            simulator.run.when_line(this_export, lambda: daemon.current.send(signal.SIGKILL))
            url = daemon.start()
        else:
            url = daemon.start(signal_on={moment: signal.SIGKILL})
        assert url is not None
        assert post_delivery(url, webhook_id, f"Lamp {webhook_id}") == 202
        run = daemon.current
        assert run.wait_exit() == -signal.SIGKILL, run.tail()
        # Killed inside the window: a POST may have happened, nothing recorded its outcome.
        # The kill is sent when the test reads the line, so the daemon may, rarely, have
        # committed the project id by the time it lands (the loopback simulator answers in
        # about a millisecond); either way the restart must not export the job again.
        assert job_states(daemon.db_path)[shop_job_id(webhook_id)] in {"submitting", "submitted"}

    assert daemon.start() is not None
    wait_until(
        lambda: job_states(daemon.db_path) == dict.fromkeys(jobs, "notified"),
        what="every job notified",
        explain=lambda: f"{job_states(daemon.db_path)}\n{daemon.current.tail()}",
    )
    assert simulator.exports_per_job(jobs) == dict.fromkeys(jobs, 1)
    assert simulator.state()["export_count"] == len(jobs)
    announced = ready_lines(tmp_path / "videos.jsonl")
    assert all(announced.get(job, 0) >= 1 for job in jobs), announced


def test_sighup_fetches_saved_projects_again_and_the_daemon_keeps_serving(
    tmp_path: Path,
    daemon_factory: Callable[[str], Daemon],
    simulator_process: Callable[[float], SimulatorProcess],
) -> None:
    simulator = simulator_process(0.3)
    daemon = daemon_factory(flow_config(tmp_path, simulator.url, "saved-project"))
    url = daemon.start()
    assert url is not None
    run = daemon.current
    assert not run.events("template.refreshed")
    run.send(signal.SIGHUP)
    refreshed = run.wait_for(
        lambda r: r.get("event") == "template.refreshed", what="template.refreshed"
    )
    assert refreshed is not None
    assert refreshed["template"] == "promo"
    assert refreshed["project_id"] == SAMPLE_PROJECT_ID
    webhook_id = f"after-hup-{uuid.uuid4().hex[:8]}"
    assert post_delivery(url, webhook_id, "Lamp") == 202
    job = shop_job_id(webhook_id)
    wait_until(
        lambda: job_states(daemon.db_path) == {job: "notified"},
        what="the job notified after the reload",
        explain=run.tail,
    )
    assert run.process.poll() is None
