"""The daemon's event loop: uvloop where it is installed, the standard loop otherwise."""

from __future__ import annotations

import asyncio
import gc
import importlib.util

import anyio

from service.eventloop import COLLECTOR_GEN0_THRESHOLD, loop_options, tune_collector


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_daemon_runs_on_uvloop_where_it_is_installed():
    options, name = loop_options()
    module = anyio.run(_loop_module, backend="asyncio", backend_options=options)
    if importlib.util.find_spec("uvloop") is not None:
        assert name == "uvloop"
        assert module.startswith("uvloop")
    else:
        assert name == "asyncio"
        assert module.startswith("asyncio")


def test_the_standard_loop_when_uvloop_is_not_wanted():
    options, name = loop_options(prefer_uvloop=False)
    assert (options, name) == ({}, "asyncio")
    assert anyio.run(_loop_module, backend="asyncio", backend_options=options).startswith("asyncio")


def test_the_collector_is_tuned_up_never_down():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_collector()
        assert gc.get_threshold() == (COLLECTOR_GEN0_THRESHOLD, 10, 10)
        gc.set_threshold(COLLECTOR_GEN0_THRESHOLD * 2, 5, 5)
        tune_collector()
        assert gc.get_threshold() == (COLLECTOR_GEN0_THRESHOLD * 2, 5, 5)
        gc.set_threshold(0)
        tune_collector()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*saved)
