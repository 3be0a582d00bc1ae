"""How hard studiohook pushes AI Studios: one request rate for every call, one render budget.

The API documents no limits, so both are ours to keep: a token bucket shared by every request
(exports, polls, lookups) whose rate adapts to the API's answers (lowered by a 429, raised
again after quiet periods, never above a configured hard cap), paused as a whole by a 429's
Retry-After; and a fixed number of render slots, counted from what the store says each owned
job is doing.
"""

from __future__ import annotations

import contextvars
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from service.jobs.states import RENDERING
from service.log import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.jobs.ports import NothingCreatedError
    from service.jobs.schedule import Clock, Sleep
    from service.model import JobState

log = get_logger("jobs.ratelimit")

HTTP_TOO_MANY_REQUESTS = 429


class Turn:
    """A request turn taken ahead (see `RequestGate.turn`), for one request to `endpoint`.

    `held_s` is how long a Retry-After pause that began after the turn was taken still held
    that request back: the submitter dates the render's start after it.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.held_s = 0.0
        self.used = False


_admitted: contextvars.ContextVar[Turn | None] = contextvars.ContextVar(
    "studiohook_gate_admitted", default=None
)
"""The turn the current task already took (see `RequestGate.turn`)."""


class TokenBucket:
    """A token bucket in its GCRA form: `reserve` returns how long the caller must wait.

    Pure: the caller passes the time. `pause_until` makes the first slot after a pause land
    exactly at its end and the following ones spaced at the rate, so a pause never ends in a
    burst of queued requests.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.interval_s = 1.0 / rate
        self.tolerance_s = (burst - 1) * self.interval_s
        self._theoretical_at = float("-inf")
        self.paused_until = float("-inf")

    def set_rate(self, rate: float) -> None:
        """Space the following slots at `rate`; slots already handed out keep their times."""
        burst = round(self.tolerance_s / self.interval_s) + 1
        self.interval_s = 1.0 / rate
        self.tolerance_s = (burst - 1) * self.interval_s

    def reserve(self, now: float) -> float:
        """Take the next free slot; seconds from `now` until it (0 when free right away)."""
        theoretical_at = max(self._theoretical_at, now)
        allowed_at = theoretical_at - self.tolerance_s
        self._theoretical_at = theoretical_at + self.interval_s
        return max(allowed_at - now, 0.0)

    def pause_until(self, until: float) -> None:
        """No slot before `until`; later pauses extend, earlier ones never shorten."""
        if until <= self.paused_until:
            return
        self.paused_until = until
        self._theoretical_at = max(self._theoretical_at, until + self.tolerance_s)


class AdaptiveRate:
    """The request rate, paced by what the API answers (AIMD): pure, the caller passes the time.

    The API documents no limit, so the rate starts at the ceiling and only a 429 brings it
    down, multiplicatively; after each quiet period without one it climbs back additively.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float = 0.5,
        decrease: float = 0.5,
        quiet_s: float = 5.0,
        steps_to_ceiling: int = 10,
    ) -> None:
        if ceiling <= 0 or not 0 < floor <= ceiling or not 0 < decrease < 1:
            raise ValueError("need 0 < floor <= ceiling and 0 < decrease < 1")
        self.ceiling = ceiling
        self.floor = floor
        self.decrease = decrease
        self.quiet_s = quiet_s
        self.step = ceiling / steps_to_ceiling
        self.rate = ceiling
        self.cut_every_s = 1.0
        self._quiet_since = float("-inf")
        self._cut_at = float("-inf")

    def throttled(self, now: float, *, rate_tested: bool = True) -> float:
        """A 429 arrived: cut the rate and restart the quiet period.

        Requests already on the wire when the first 429 came answer the same overload, so the
        rate is cut at most once per `cut_every_s`. `rate_tested` is False when at most one
        request left since the last Retry-After pause began: a lone request refused again
        right after a pause says the overload lasts, not that the new rate is too fast, so
        it restarts the quiet period without cutting again (cutting on every such refusal
        compounds: 5 refusals in a row took the rate from 1000 to 31 requests/s).
        """
        if rate_tested and now - self._cut_at >= self.cut_every_s:
            self.rate = max(self.floor, self.rate * self.decrease)
            self._cut_at = now
        self._quiet_since = now
        return self.rate

    def at(self, now: float) -> float:
        """The rate now: one additive step for each whole quiet period since the last 429."""
        if self.rate < self.ceiling:
            periods = int((now - self._quiet_since) // self.quiet_s)
            if periods > 0:
                self.rate = min(self.ceiling, self.rate + periods * self.step)
                self._quiet_since += periods * self.quiet_s
        return self.rate


PRIORITY_ENDPOINTS = frozenset(
    {"v3.draft", "v3.project_export", "v3.export", "v3.template_modify", "legacy.export"}
)
"""Requests that start new jobs' renders: while one waits for its turn, polls and lookups wait."""


class RequestGate:
    """The client's `before_request`: every API call waits here for its slot.

    The spacing follows an `AdaptiveRate` (never above `hard_cap` when one is configured); a
    429 lowers it and its Retry-After pauses every request. A caller whose slot was reserved
    before a pause started re-checks after sleeping, so no request leaves inside a Retry-After
    window. Exports of new jobs go first: a poll waits while an export waits.
    """

    def __init__(
        self,
        rate: float,
        clock: Clock,
        *,
        burst: int = 1,
        sleep: Sleep = anyio.sleep,
        hard_cap: float | None = None,
    ) -> None:
        ceiling = min(rate, hard_cap) if hard_cap is not None else rate
        self._pace = AdaptiveRate(ceiling, floor=min(0.5, ceiling))
        self._bucket = TokenBucket(ceiling, burst)
        self._clock = clock
        self._sleep = sleep
        self._priority_waiting = 0
        self._priority_done = anyio.Event()
        self._sent_since_pause = 0

    @property
    def rate(self) -> float:
        """The request rate in force now."""
        return self._pace.at(self._clock())

    def throttled(self, error: NothingCreatedError) -> None:
        """A request was refused for load: slow down on a 429, and obey its Retry-After.

        The pace is cut only if the refusal can be about it: once at least two requests left
        since the last pause began (see `AdaptiveRate.throttled`).
        """
        now = self._clock()
        if error.status == HTTP_TOO_MANY_REQUESTS:
            before = self._pace.rate
            rate = self._pace.throttled(now, rate_tested=self._sent_since_pause > 1)
            self._bucket.set_rate(rate)
            if rate < before:
                log.info("api.rate_lowered", requests_per_s=round(rate, 3))
        if error.retry_after_s is not None:
            self.pause_for(error.retry_after_s)

    async def __call__(self, endpoint: str) -> None:
        """Wait until a request to `endpoint` may be sent.

        Inside `turn(endpoint)` the turn is already taken and the request leaves at once,
        unless a Retry-After pause began since: no request is ever sent inside one.
        """
        turn = _admitted.get()
        if turn is not None and turn.endpoint == endpoint and not turn.used:
            turn.used = True
            started = self._clock()
            if started < self._bucket.paused_until:
                await self._wait(endpoint)
                turn.held_s = self._clock() - started
        else:
            await self._wait(endpoint)
        self._sent_since_pause += 1

    @asynccontextmanager
    async def turn(self, endpoint: str) -> AsyncIterator[Turn]:
        """Take the next request turn for `endpoint` now; the request inside leaves unqueued.

        The submitter waits here BEFORE it commits `submitting`, so the commit and the paid
        POST follow each other at once: a crash while a job waits its turn leaves it plainly
        `mapped`, and only a request actually on the wire can be in doubt. The `Turn` says how
        long a pause that began meanwhile still held the request.
        """
        await self._wait(endpoint)
        turn = Turn(endpoint)
        token = _admitted.set(turn)
        try:
            yield turn
        finally:
            _admitted.reset(token)

    async def _wait(self, endpoint: str) -> None:
        if endpoint in PRIORITY_ENDPOINTS:
            self._priority_waiting += 1
            try:
                await self._reserve(endpoint)
            finally:
                self._priority_waiting -= 1
                if self._priority_waiting == 0:
                    self._priority_done.set()
                    self._priority_done = anyio.Event()
            return
        while self._priority_waiting > 0:
            await self._priority_done.wait()
        await self._reserve(endpoint)

    async def _reserve(self, endpoint: str) -> None:
        self._bucket.set_rate(self._pace.at(self._clock()))
        while True:
            wait_s = self._bucket.reserve(self._clock())
            if wait_s > 0:
                await self._sleep(wait_s)
            if self._clock() >= self._bucket.paused_until:
                return
            log.debug("request held by pause", endpoint=endpoint)

    @property
    def paused(self) -> bool:
        """Whether a Retry-After pause holds every request right now."""
        return self._clock() < self._bucket.paused_until

    async def pause_over(self) -> None:
        """Return once no Retry-After pause is in force.

        The submitter waits here before its last claim check, so that the paid request does
        not wait out a pause *after* that check (see `OwnedJobs.may_pay`).
        """
        while (left_s := self._bucket.paused_until - self._clock()) > 0:
            await self._sleep(left_s)

    def pause_until(self, until: float) -> None:
        """Hold ALL requests until `until` (a 429's Retry-After applies to the account)."""
        if until > self._bucket.paused_until:
            log.info("api requests paused", seconds=round(until - self._clock(), 3))
            self._sent_since_pause = 0
        self._bucket.pause_until(until)

    def pause_for(self, seconds: float) -> None:
        """Hold all requests for `seconds` from now."""
        self.pause_until(self._clock() + seconds)


class RenderSlots:
    """At most `capacity` renders in flight: owned jobs that render, plus submits under way.

    A slot is never handed out and taken back by whichever loop moves a job. It is derived:
    `settle` hears every committed state of every owned job (from `OwnedJobs`, the one place
    that commits for this worker), and a submit task `reserve`s a slot for its own lifetime
    and `unreserve`s it when it ends, whatever happened. A job both reserved and rendering
    counts once. Renders found at start are counted even beyond a lowered capacity.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._rendering: set[str] = set()
        self._reserved: set[str] = set()
        self._freed = anyio.Event()

    @property
    def in_flight(self) -> int:
        """How many slots are held."""
        return len(self._rendering | self._reserved)

    def holds(self, job_id: str) -> bool:
        """Whether `job_id` counts against the capacity now."""
        return job_id in self._rendering or job_id in self._reserved

    async def reserve(self, job_id: str) -> None:
        """Wait for a free slot and reserve it for a submit of `job_id` (at once if it has one)."""
        while not self.holds(job_id) and self.in_flight >= self.capacity:
            await self._freed.wait()
        self._reserved.add(job_id)

    def unreserve(self, job_id: str) -> None:
        """The submit of `job_id` ended; its slot stays taken only if the job now renders."""
        if job_id in self._reserved:
            self._reserved.discard(job_id)
            self._notify()

    def settle(self, job_id: str, state: JobState | None) -> None:
        """A committed state of an owned job (None: no longer ours): count it iff it renders."""
        if state is not None and state in RENDERING:
            self._rendering.add(job_id)
        elif job_id in self._rendering:
            self._rendering.discard(job_id)
            self._notify()

    def _notify(self) -> None:
        self._freed.set()
        self._freed = anyio.Event()
