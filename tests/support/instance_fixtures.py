"""Several `studiohook serve` processes on one PostgreSQL database: their configs and the store.

Each instance gets its own owner id, state directory and a short lease, so take-over happens
within a test's few seconds; the store is read with psycopg, as the instances write it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.support.daemon_fixtures import daemon_config


def instance_config(
    tmp_path: Path,
    api_url: str,
    database_url: str,
    name: str,
    *,
    lease_s: float,
    max_concurrent_exports: int = 4,
    **options: Any,
) -> str:
    """A daemon config on the shared database, as instance `name` with leases of `lease_s`."""
    config = daemon_config(
        tmp_path, api_url=api_url, max_concurrent_exports=max_concurrent_exports, **options
    )
    config = config.replace(
        f'state_dir = "{tmp_path / "state"}"',
        f'state_dir = "{tmp_path / f"state-{name}"}"\ninstance = "{name}"\n'
        f"lease_seconds = {lease_s}",
    )
    return config.replace("[http]", f'[store]\nurl = "{database_url}"\n\n[http]', 1)


def jobs_by(database_url: str) -> dict[str, tuple[str, str | None]]:
    """Every job's state and owner (the instance whose claim it carries)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT job_id, state, owner FROM jobs").fetchall()
    return {job_id: (state, owner) for job_id, state, owner in rows}


def fences_of(database_url: str) -> dict[str, int]:
    """Every job's fence: bumped by each claim."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT job_id, fence FROM jobs").fetchall()
    return {job_id: int(fence) for job_id, fence in rows}


def transitions_of(database_url: str) -> list[tuple[str, str | None, str, float]]:
    """The whole history, in commit order: (job, from, to, at)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT job_id, from_state, to_state, at FROM transitions ORDER BY id"
        ).fetchall()
    return [(job_id, before, after, float(at)) for job_id, before, after, at in rows]


def announcements_of(database_url: str, event_type: str) -> dict[str, int]:
    """How many outbox rows of `event_type` each job has (one per round at most)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT job_id, COUNT(*) FROM outbox WHERE event_type = %s GROUP BY job_id",
            (event_type,),
        ).fetchall()
    return {job_id: int(n) for job_id, n in rows}
