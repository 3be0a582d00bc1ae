"""Capped exponential back-off with full jitter: one rule for every retry loop in the service.

Full jitter (a uniform draw between zero and the capped exponential) spreads the retries of
many jobs, or of many instances after a broker restart, instead of having them knock in
lockstep. Pure: the random source is a parameter, so the schedule is tested without time.
"""

from __future__ import annotations

from typing import Protocol

_MAX_EXPONENT = 62  # beyond this the ceiling is capped anyway


class RandomSource(Protocol):
    """The part of `random.Random` jitter needs, so tests can pin it."""

    def random(self) -> float:
        """Uniform in [0, 1)."""
        ...


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: RandomSource) -> float:
    """The wait before retry number `attempt` (1 for the first retry; 0 means no wait).

    Uniform in [0, min(cap, base * 2**(attempt-1))).
    """
    if attempt <= 0:
        return 0.0
    exponent = min(attempt - 1, _MAX_EXPONENT)
    return rng.random() * min(cap_s, base_s * 2.0**exponent)
