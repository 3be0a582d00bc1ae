"""Stand-ins for time and chance, so pure logic is tested at the exact moments it decides."""

from __future__ import annotations

START_TIME = 1_700_000_000.0


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self, now: float = START_TIME) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Pinned:
    """A random source that always draws the same fraction of its range."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction
