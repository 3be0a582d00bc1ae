"""Polls per job: the real Tracker on a simulated clock vs the tutorial's fixed 3-second loop.

Each render is one `submitted` job in a real SQLite store, followed by the real `Tracker`
(with the shipped config's poll timing) whose clock and sleep are simulated: a sleep moves the
clock instead of waiting, so a 300 s render is followed in milliseconds. Progress comes from
the simulator's own model (`SimProject.progress_at`: linear over the render time, a float
rounded to 0.01, as the API reports it). Both loops read the same model:

  studiohook        Tracker + next_poll_delay: polls timed from the observed progress rate.
  tutorial          the seeds' loop as written: poll right after the export, then every 3 s.
  wait-then-poll    the same loop waiting 3 s before its first poll (ceil(R/3) polls).

Detection delay = the poll that saw 100 % minus the moment the render reached 100 %. A render
length that is a multiple of 3 s would flatter the fixed loop (it polls exactly at 100 %), so
each length R is run as R, R+0.5, ... R+2.5 s and the figures are means (and the worst case).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from _shared import (
    SHOPIFY_SOURCE,
    WatchedStore,
    configure_bench_logging,
    emit_result,
    parse_args,
    print_table,
    ratio,
    say,
    shipped_config,
)

from service.aistudios.responses import Progress, ProjectState, ProjectSummary
from service.aistudios.simulator import SimProject
from service.config import AIStudiosConfig
from service.jobs.pipeline import JobPipeline
from service.jobs.ratelimit import RequestGate
from service.model import InboundEvent, Job, JobState, JobUpdate, NewJob, job_id_for

RENDERS_S = (10.0, 60.0, 300.0)
OFFSETS_S = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
"""Each length is also run this much longer: one full 3 s period, so no loop wins by alignment."""
QUICK_OFFSETS_S = (0.0, 1.5)
TUTORIAL_INTERVAL_S = 3.0
START = 1_700_000_000.0
FULL = 100.0
UNBOUNDED_RATE = 1e9
"""Request gate rate: the simulated clock does not move while a request waits, so no limit."""


class SimulatedClock:
    """Seconds that move only when the tracker sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Move the clock instead of waiting; yield once so other tasks run as after a sleep."""
        self.now += max(seconds, 0.0)
        await anyio.sleep(0)


class LinearRenders:
    """The AI Studios endpoints the pipeline calls, over the simulator's progress model on the
    simulated clock; counts every progress read."""

    def __init__(self, clock: SimulatedClock, render_s: float) -> None:
        self._clock = clock
        self._render_s = render_s
        self.projects: dict[str, SimProject] = {}
        self.reads = 0

    async def export_v3(
        self, body: dict[str, Any], *, name: str, webhook_url: str | None = None
    ) -> str:
        """A render of the configured length starts now."""
        del body, webhook_url
        project_id = f"sim-{len(self.projects) + 1}"
        self.projects[project_id] = SimProject(
            project_id, name, [], self._clock(), "v3", render_seconds=self._render_s
        )
        return project_id

    async def create_draft_v3(self, body: dict[str, Any], *, name: str) -> str:
        """An unexported project: nothing renders yet."""
        del body
        project_id = f"sim-{len(self.projects) + 1}"
        self.projects[project_id] = SimProject(
            project_id, name, [], self._clock(), "v3", rendering=False
        )
        return project_id

    async def export_project_v3(self, project_id: str, *, webhook_url: str | None = None) -> str:
        """The draft's render of the configured length starts now."""
        del webhook_url
        project = self.projects[project_id]
        project.created_at = self._clock()
        project.render_seconds = self._render_s
        project.rendering = True
        return project_id

    async def get_project_v3(self, project_id: str) -> ProjectState:
        """Never needed here (no export is ambiguous), answered truthfully anyway."""
        project = self.projects[project_id]
        progress = project.progress_at(self._clock())
        return ProjectState(project_id, None, progress, project.rendering, None, None, {})

    async def export_legacy(self, scenes: list[dict[str, Any]]) -> str:
        """The legacy create renders the same way."""
        return await self.export_v3({"scenes": scenes}, name="legacy")

    async def progress_v3(self, project_id: str) -> Progress:
        """Progress as the v3 endpoint reports it (a URL once at 100)."""
        self.reads += 1
        progress = self.projects[project_id].progress_at(self._clock())
        url = f"https://example.invalid/{project_id}.mp4" if progress >= FULL else None
        return Progress(progress, url)

    async def progress_legacy(self, key: str) -> Progress:
        """The legacy endpoint reads the same model."""
        return await self.progress_v3(key)

    async def find_project_by_name(self, name: str) -> ProjectSummary | None:
        """Never needed here (no create is ambiguous), answered truthfully anyway."""
        for project in self.projects.values():
            if project.name == name:
                return ProjectSummary(project.id, name, None, None)
        return None


@dataclass(frozen=True, slots=True)
class Followed:
    """How one loop followed one render."""

    polls: int
    detection_delay_s: float


async def _seed_mapped(store: WatchedStore, clock: SimulatedClock, render_s: float) -> str:
    """A job as the preparer leaves it: `mapped`, with an export body, due now."""
    key = f"polls-{render_s:g}"
    event = InboundEvent(
        source=SHOPIFY_SOURCE,
        dedupe_key=key,
        event_id=f"evt-{key}",
        event_type="products/create",
        body=b"{}",
        headers={},
        received_at=clock(),
    )
    job_id = job_id_for(SHOPIFY_SOURCE, key, "new-product")
    await store.accept_event(event, [NewJob(job_id, "new-product", f"bench {key}")])
    update = JobUpdate(export_body=b"{}", api="v3")
    await store.transition(job_id, {JobState.RECEIVED}, JobState.MAPPED, update)
    return job_id


async def _no_mapping(job: Job) -> None:
    raise RuntimeError(f"job {job.job_id} was seeded mapped; nothing to prepare")


async def _follow_with_pipeline(
    directory: Path, settings: AIStudiosConfig, render_s: float
) -> Followed:
    """One render with its own store and simulated clock, through the real JobPipeline."""
    clock = SimulatedClock(START)
    store = WatchedStore(directory / f"polls-{render_s:g}.db", expected=1, clock=clock)
    await store.open()
    try:
        job_id = await _seed_mapped(store, clock, render_s)
        api = LinearRenders(clock, render_s)
        pipeline = JobPipeline(
            store=store,
            api=api,
            gate=RequestGate(UNBOUNDED_RATE, clock, sleep=clock.sleep),
            settings=settings,
            prepare=_no_mapping,
            outbox_for=lambda _job, _event: (),
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(0),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            with anyio.fail_after(30):
                await store.wait_ready(job_id)
            tg.cancel_scope.cancel()
        job = await store.get_job(job_id)
    finally:
        await store.close()
    if job is None or job.ready_at is None or job.project_id is None:
        raise RuntimeError("the job is not ready")
    project = api.projects[job.project_id]
    return Followed(job.polls, job.ready_at - (project.created_at + render_s))


def _follow_fixed_loop(render_s: float, *, poll_first: bool) -> Followed:
    """The tutorial's `while (true) { poll; if done break; wait 3 s }` on the same model."""
    project = SimProject("tutorial", "tutorial", [], START, "v3", render_seconds=render_s)
    now = START if poll_first else START + TUTORIAL_INTERVAL_S
    polls = 0
    while True:
        polls += 1
        if project.progress_at(now) >= FULL:
            return Followed(polls, now - (START + render_s))
        now += TUTORIAL_INTERVAL_S


@dataclass(frozen=True, slots=True)
class Compared:
    """One nominal render length, followed by each loop over several phases."""

    render_s: float
    ours: list[Followed]
    tutorial: list[Followed]
    waiting: list[Followed]


def _mean_polls(followed: list[Followed]) -> float:
    return sum(f.polls for f in followed) / len(followed)


def _mean_delay(followed: list[Followed]) -> float:
    return sum(f.detection_delay_s for f in followed) / len(followed)


def _max_delay(followed: list[Followed]) -> float:
    return max(f.detection_delay_s for f in followed)


async def run(offsets: tuple[float, ...]) -> dict[str, Any]:
    """Each render length once per phase offset, one at a time (one simulated clock each)."""
    compared: list[Compared] = []
    with tempfile.TemporaryDirectory(prefix="bench-polls-") as tmp:
        settings = shipped_config(Path(tmp) / "state", "unused").aistudios
        configure_bench_logging(Path(tmp) / "service.log")
        for nominal_s in RENDERS_S:
            say(f"following {len(offsets)} renders of {nominal_s:g} s (+ {offsets} s) ...")
            lengths = [nominal_s + offset for offset in offsets]
            ours = [await _follow_with_pipeline(Path(tmp), settings, r) for r in lengths]
            tutorial = [_follow_fixed_loop(r, poll_first=True) for r in lengths]
            waiting = [_follow_fixed_loop(r, poll_first=False) for r in lengths]
            compared.append(Compared(nominal_s, ours, tutorial, waiting))
    print_table(
        f"polls per job, mean over {len(offsets)} render lengths each (R + {offsets} s); "
        f"simulated clock; poll floor {settings.poll_min_interval_s:g} s, "
        f"first poll {settings.first_poll_s:g} s, ceiling {settings.poll_max_interval_s:g} s",
        [
            "render R",
            "polls studiohook",
            "polls tutorial",
            "polls wait-first",
            "ratio vs tutorial",
            "detect studiohook mean/max (s)",
            "detect tutorial mean/max (s)",
        ],
        [
            (
                f"{c.render_s:g} s",
                _mean_polls(c.ours),
                _mean_polls(c.tutorial),
                _mean_polls(c.waiting),
                ratio(_mean_polls(c.ours), _mean_polls(c.tutorial)),
                f"{_mean_delay(c.ours):.2f} / {_max_delay(c.ours):.2f}",
                f"{_mean_delay(c.tutorial):.2f} / {_max_delay(c.tutorial):.2f}",
            )
            for c in compared
        ],
    )
    figures: dict[str, Any] = {
        "first_poll_s": settings.first_poll_s,
        "poll_floor_s": settings.poll_min_interval_s,
        "poll_ceiling_s": settings.poll_max_interval_s,
        "phase_offsets_s": list(offsets),
    }
    for c in compared:
        figures[f"{c.render_s:g}s"] = {
            "studiohook_polls": round(_mean_polls(c.ours), 2),
            "tutorial_polls": round(_mean_polls(c.tutorial), 2),
            "wait_first_polls": round(_mean_polls(c.waiting), 2),
            "polls_ratio": round(ratio(_mean_polls(c.ours), _mean_polls(c.tutorial)), 3),
            "studiohook_detection_mean_s": round(_mean_delay(c.ours), 3),
            "studiohook_detection_max_s": round(_max_delay(c.ours), 3),
            "tutorial_detection_mean_s": round(_mean_delay(c.tutorial), 3),
            "tutorial_detection_max_s": round(_max_delay(c.tutorial), 3),
        }
    return figures


def main() -> None:
    """`python bench/polls.py [--quick]`: --quick follows two phases per length instead of six."""
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "polls bench")
    emit_result("polls", anyio.run(run, QUICK_OFFSETS_S if args.quick else OFFSETS_S))


if __name__ == "__main__":
    main()
