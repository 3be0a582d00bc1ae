"""The one way to reach AI Studios from config: the paid service, or the simulator in its place.

`serve` and `submit` share it, so "no credentials" means the same thing everywhere: a
simulator started for the process, with a random key, and the real service never touched.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from service.aistudios.client import AIStudiosClient
from service.aistudios.simulator import Simulator, SimulatorKnobs
from service.config import Config
from service.log import get_logger

log = get_logger("aistudios.connect")


@dataclass(frozen=True, slots=True)
class Connection:
    """An entered client and where it points; `simulator` is set when it stands in."""

    client: AIStudiosClient
    api_url: str
    legacy_url: str
    simulator: Simulator | None


@asynccontextmanager
async def connect(
    cfg: Config,
    *,
    knobs: SimulatorKnobs | None = None,
    before_request: Callable[[str], Awaitable[None]] | None = None,
    on_call: Callable[[str, str], None] | None = None,
) -> AsyncIterator[Connection]:
    """An AI Studios client from config, with the simulator started when no credentials are set."""
    a = cfg.aistudios
    simulator = None
    api_url, legacy_url = a.base_url, a.legacy_base_url
    if a.uses_simulator:
        simulator = Simulator(knobs or SimulatorKnobs(render_seconds=a.simulator.render_seconds))
        api_url = legacy_url = await simulator.start(port=a.simulator.port)
        log.info("aistudios.simulator_listening", url=api_url)
    try:
        client = AIStudiosClient(
            base_url=api_url,
            legacy_base_url=legacy_url,
            api_key=a.api_key or (secrets.token_hex(8) if simulator else None),
            app_id=a.app_id,
            user_key=a.user_key,
            request_timeout_s=a.request_timeout_s,
            before_request=before_request,
            on_call=on_call,
        )
        async with client:
            yield Connection(client, api_url, legacy_url, simulator)
    finally:
        if simulator is not None:
            with anyio.CancelScope(shield=True):
                await simulator.stop()
