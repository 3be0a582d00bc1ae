"""Which asyncio event loop the daemon runs on: uvloop where it is installed, else the standard one.

uvloop runs aiohttp's transport and protocol callbacks in C; on the webhook path that is a
large share of the CPU per request (see README, Performance). It is optional: where it is not
installed (another platform, a build without it) the standard loop runs the same code.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def loop_options(*, prefer_uvloop: bool = True) -> tuple[dict[str, Any], str]:
    """The `backend_options` for `anyio.run(..., backend="asyncio")`, and the loop's name."""
    if prefer_uvloop and importlib.util.find_spec("uvloop") is not None:
        return {"use_uvloop": True}, "uvloop"
    return {}, "asyncio"
