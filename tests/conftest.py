"""Shared pytest set-up: the anyio plugin on asyncio, and the fixture modules of each area."""

import pytest

# Each area keeps its shared fixtures in tests/support/<area>_fixtures.py and lists it here.
pytest_plugins: list[str] = ["tests.support.notify_fixtures", "tests.support.mqtt_fixtures", "tests.support.store_fixtures", "tests.support.postgres_fixtures", "tests.support.aistudios_fixtures", "tests.support.jobs_fixtures", "tests.support.daemon_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
