"""Capped exponential backoff with full jitter, kept pure so the schedule is tested without time.

Full jitter (a uniform draw between zero and the capped exponential) spreads reconnects of many
instances after a broker restart instead of having them knock in lockstep.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def backoff_delay_s(
    attempt: int,
    *,
    min_s: float,
    max_s: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Return the wait before retry number `attempt` (1 for the first retry; 0 means no wait).

    The ceiling doubles from `min_s` per attempt up to `max_s`; the wait is drawn uniformly
    below it and never below zero.
    """
    if attempt <= 0:
        return 0.0
    exponent = min(attempt - 1, 62)  # beyond this the ceiling is capped anyway
    ceiling = min(max_s, min_s * 2.0**exponent)
    return max(0.0, uniform(0.0, ceiling))
