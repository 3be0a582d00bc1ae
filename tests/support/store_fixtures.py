"""Store fixtures: an opened SQLite store in tmp_path, and the engines the contract suite runs on.

`store` uses the real clock, so other areas can mix it with their own timing. The contract
suite uses `engine_store`, whose clock is `store_clock` (a FakeClock tests move by hand), and
`store_engine.make()` to open a second store on the same database, which is what a restart is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.model import InboundEvent, JobState, NewJob, job_id_for
from service.store.base import Store
from service.store.postgres import PostgresStore
from service.store.sqlite import SQLiteStore
from tests.support.fakes import START_TIME, FakeClock

ENGINES = ["sqlite", "postgresql"]


@dataclass(frozen=True)
class StoreEngine:
    """One engine under test: `make()` builds a new, unopened store on the same database."""

    name: str
    make: Callable[[], Store]
    url: str = ""
    """The `[store] url` naming that database."""


def sample_event(
    key: str = "k1", *, source: str = "shop", received_at: float = START_TIME
) -> InboundEvent:
    """An inbound event whose dedupe key and event id derive from `key`."""
    return InboundEvent(
        source=source,
        dedupe_key=key,
        event_id=f"evt-{key}",
        event_type="products/create",
        body=b'{"id": 1, "title": "Mug"}',
        headers={"x-shopify-topic": "products/create"},
        received_at=received_at,
    )


def sample_job(
    event: InboundEvent, route: str = "new-product", state: JobState = JobState.RECEIVED
) -> NewJob:
    """The job a route would derive from `event`, with the deterministic id and export name."""
    job_id = job_id_for(event.source, event.dedupe_key, route)
    return NewJob(job_id=job_id, route=route, export_name=f"sh-{job_id}", state=state)


@pytest.fixture
def store_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=ENGINES)
def store_engine(
    request: pytest.FixtureRequest, tmp_path: Path, store_clock: FakeClock
) -> StoreEngine:
    if request.param == "sqlite":
        path = tmp_path / "state" / "studiohook.db"
        return StoreEngine(
            "sqlite", lambda: SQLiteStore(path, clock=store_clock), f"sqlite:///{path}"
        )
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        return StoreEngine("postgresql", lambda: PostgresStore(url, clock=store_clock), url)
    raise AssertionError(f"unknown engine {request.param}")


@pytest.fixture
async def engine_store(store_engine: StoreEngine, anyio_backend: str) -> AsyncIterator[Store]:
    opened = store_engine.make()
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "state" / "studiohook.db")
    await opened.open()
    yield opened
    await opened.close()
