"""Which asyncio event loop the daemon runs on: uvloop where it is installed, else the standard one.

uvloop runs aiohttp's transport and protocol callbacks in C; on the webhook path that is a
large share of the CPU per request (see README, Performance). It is optional: where it is not
installed (another platform, a build without it) the standard loop runs the same code.

`tune_collector` sets the garbage collector for a daemon that allocates in bursts.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Any

COLLECTOR_GEN0_THRESHOLD = 10_000
"""Net allocations of container objects before the youngest generation is collected.

A webhook's parsed payload, context and rows are a few hundred objects, freed once it is
answered; with 32 deliveries in flight the default 700 is crossed every 60 or so deliveries,
and those collections cost about 14 us a delivery (4 % of the event loop's CPU) under webhook
load. At 10,000 they are rare; what they reclaim (cycles) is the same, found a little later.
"""


def tune_collector() -> None:
    """Raise the youngest generation's threshold (never lower it; a disabled collector stays so)."""
    youngest, *older = gc.get_threshold()
    if 0 < youngest < COLLECTOR_GEN0_THRESHOLD:
        gc.set_threshold(COLLECTOR_GEN0_THRESHOLD, *older)


def loop_options(*, prefer_uvloop: bool = True) -> tuple[dict[str, Any], str]:
    """The `backend_options` for `anyio.run(..., backend="asyncio")`, and the loop's name."""
    if prefer_uvloop and importlib.util.find_spec("uvloop") is not None:
        return {"use_uvloop": True}, "uvloop"
    return {}, "asyncio"
