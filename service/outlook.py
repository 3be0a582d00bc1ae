"""What the money guard rails would do with one event right now, as `studiohook preview` says it.

A user about to wire a shop to studiohook wants to know before paying: would this event reuse
an earlier video, be folded into a job already waiting, or wait behind a full spending cap?
The answer comes from the configured store, read-only (`service.store.peek`), through the
pipeline's own functions: the render key is `render_key` of the exact body the job would
send, the coalesce key is `coalesce_key_for`, the caps are `caps_for`. The sentences are
built by pure functions below, so each case is tested without a store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.jobs.budget import BudgetLimits, caps_for
from service.jobs.cache import reuse_since
from service.jobs.ports import UrlProbe
from service.model import Job, JobState, SpendCap
from service.notify.probe import HttpProbe
from service.store.peek import StorePeek, StoreUnreadableError, peek_store


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the pipeline would compute for the event's job: its id and both keys."""

    route: str
    job_id: str
    render_key: str
    coalesce_key: str | None
    cache_seconds: float | None
    coalesce_seconds: float


@dataclass(frozen=True, slots=True)
class CacheFinding:
    """The earlier job the render cache would reuse, and whether its URL still downloads."""

    job: Job
    downloads: bool


def _ago(now: float, then: float | None) -> str:
    return "" if then is None else f", {max(0.0, now - then):.0f} s ago"


def cache_line(facts: EventFacts, found: CacheFinding | None, now: float) -> str:
    """The render cache's answer: off, a miss, a hit naming the job, or a URL gone."""
    if reuse_since(now, facts.cache_seconds) is None:
        return f"render cache: off (route {facts.route} sets no cache_seconds)"
    if found is None:
        return (
            "render cache: no cached video (no identical export became ready"
            f" in the last {facts.cache_seconds:g} s)"
        )
    ready = _ago(now, found.job.ready_at)
    if not found.downloads:
        return (
            f"render cache: job {found.job.job_id} made an identical video{ready}, but its URL"
            " no longer downloads: this event would be exported again"
        )
    return (
        f"render cache: hit: would reuse the video of job {found.job.job_id}"
        f" (ready{ready.removeprefix(',')}); nothing would be billed"
    )


def _waiting_text(job: Job, now: float) -> str:
    if job.state is JobState.HELD:
        return f"{job.job_id} (held by a spending cap)"
    due = job.next_attempt_at
    if due is None or due <= now:
        return f"{job.job_id} (mapped, its window is over: it may be submitted first)"
    return f"{job.job_id} (mapped, its window ends in {due - now:.0f} s)"


def coalesce_line(facts: EventFacts, waiting: Sequence[Job], now: float) -> str:
    """Coalescing's answer: off, a new window, or the waiting job(s) this one supersedes."""
    if facts.coalesce_key is None:
        return f"coalescing: off (route {facts.route} sets no coalesce_key)"
    others = [job for job in waiting if job.job_id != facts.job_id]
    if not others:
        return (
            f"coalescing: key {facts.coalesce_key!r}: no job waiting; this one would wait"
            f" {facts.coalesce_seconds:g} s for newer events of its key"
        )
    named = ", ".join(_waiting_text(job, now) for job in others)
    return f"coalescing: key {facts.coalesce_key!r}: would supersede job {named}"


def caps_line(caps: Sequence[SpendCap], spent: Mapping[str, int], *, reused: bool) -> str:
    """The caps' answer: none, room left, or the full cap that would hold the job now.

    `spent` maps each cap's period to the billed exports it counts so far.
    """
    if not caps:
        return "spending caps: none"
    figures = ", ".join(f"{cap.period} {spent[cap.period]}/{cap.limit} spent" for cap in caps)
    if reused:
        return f"spending caps: {figures} (a reused video is not billed)"
    full = [cap for cap in caps if spent[cap.period] >= cap.limit]
    if full:
        return (
            f"spending caps: would hold it now: {figures}; held until a cap is raised"
            " or its period rolls over"
        )
    return f"spending caps: room left: {figures}"


async def spent_under(peek: StorePeek, caps: Sequence[SpendCap]) -> dict[str, int]:
    """Each cap's count as the store decides it: every route's, or the cap's route's only."""
    spent: dict[str, int] = {}
    for cap in caps:
        counts = await peek.spend_counts(cap.since)
        spent[cap.period] = sum(counts.values()) if cap.route is None else counts.get(cap.route, 0)
    return spent


async def guard_rail_lines(
    peek: StorePeek, probe: UrlProbe, facts: EventFacts, limits: BudgetLimits, now: float
) -> list[str]:
    """Every guard rail's answer for this event, reading the store (never writing it)."""
    existing = await peek.get_job(facts.job_id)
    if existing is not None:
        duplicate = (
            f"duplicate: the store already has this event as job {existing.job_id}"
            f" ({existing.state.value}): it would not be exported again"
        )
        return [duplicate]
    found = None
    since = reuse_since(now, facts.cache_seconds)
    if since is not None:
        earlier = await peek.cached_render(facts.render_key, since)
        if earlier is not None and earlier.download_url is not None:
            found = CacheFinding(earlier, await probe.downloads(earlier.download_url))
    waiting = await peek.waiting_of_key(facts.coalesce_key) if facts.coalesce_key else []
    caps = caps_for(limits, facts.route, now)
    spent = await spent_under(peek, caps)
    return [
        cache_line(facts, found, now),
        coalesce_line(facts, waiting, now),
        caps_line(caps, spent, reused=found is not None and found.downloads),
    ]


def lines_without_store(facts: EventFacts, limits: BudgetLimits, now: float) -> list[str]:
    """The answers when the store does not exist yet: nothing cached, waiting or spent."""
    caps = caps_for(limits, facts.route, now)
    return [
        cache_line(facts, None, now),
        coalesce_line(facts, [], now),
        caps_line(caps, dict.fromkeys((cap.period for cap in caps), 0), reused=False),
    ]


async def store_outlook(
    store_url: str, facts: EventFacts, limits: BudgetLimits, now: float
) -> list[str]:
    """The guard rails' answers from the configured store, opened read-only.

    A store that does not exist (or cannot be read) is said first, plainly; the answers
    then follow from an empty store.
    """
    probe = HttpProbe()
    try:
        async with peek_store(store_url) as peek:
            return await guard_rail_lines(peek, probe, facts, limits, now)
    except StoreUnreadableError as exc:
        return [str(exc), *lines_without_store(facts, limits, now)]
    finally:
        await probe.aclose()
