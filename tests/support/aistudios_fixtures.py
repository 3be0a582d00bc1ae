"""Shared AI Studios fixtures: a running simulator and a client pointed at it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.aistudios.client import AIStudiosClient
from service.aistudios.simulator import Simulator, SimulatorKnobs

FAST_RENDER_S = 0.2
TEST_API_KEY = "test-api-key"


def v3_scene(index: int = 0) -> dict[str, Any]:
    """The smallest scene the v3 export page accepts."""
    return {
        "sceneIdx": index,
        "background": {"id": "background", "type": "background", "source_type": "image"},
        "clips": [],
        "scripts": [
            {"org": "Hello", "isTTS": False, "tts": None, "modelId": "M1", "clothId": "C1"}
        ],
    }


def v3_body(scenes: int = 1) -> dict[str, Any]:
    """A minimal valid v3 export body."""
    return {"orientation": "landscape", "scenes": [v3_scene(i) for i in range(scenes)]}


@asynccontextmanager
async def running_simulator(
    knobs: SimulatorKnobs | None = None, clock: Callable[[], float] | None = None
) -> AsyncIterator[Simulator]:
    """A started simulator, stopped on exit."""
    simulator = Simulator(
        knobs or SimulatorKnobs(render_seconds=FAST_RENDER_S), clock=clock or time.monotonic
    )
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def client_for(simulator: Simulator, **kwargs: Any) -> AIStudiosClient:
    """A client aimed at the simulator (same URL for both API generations)."""
    kwargs.setdefault("request_timeout_s", 5.0)
    if "app_id" not in kwargs:
        kwargs.setdefault("api_key", TEST_API_KEY)
    return AIStudiosClient(
        base_url=simulator.base_url, legacy_base_url=simulator.base_url, **kwargs
    )


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """A started simulator with a fast render, accepting any API key."""
    async with running_simulator() as started:
        yield started


@pytest.fixture
async def aistudios_client(simulator: Simulator) -> AsyncIterator[AIStudiosClient]:
    """An entered client pointed at the `simulator` fixture with a static API key."""
    async with client_for(simulator) as client:
        yield client
