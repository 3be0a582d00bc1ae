"""Everything the jobs core needs from outside, in one place: the store, the API, the clock.

The core (submitter, reconciler, tracker, their pure decisions) is written against these
Protocols and this error vocabulary only. The AI Studios client implements the API port and
raises subclasses of these errors, so the core never imports an adapter's exception classes;
tests pass fakes of any of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.aistudios.responses import Progress, ProjectState, ProjectSummary
    from service.model import Job, JobState, JobUpdate, NewOutboxMessage, SpendCap


# --- what an API call can tell the core ---------------------------------------------------


class ApiError(Exception):
    """A call to the video API failed; the subclass says what the core may do next."""

    message: str
    status: int | None
    endpoint: str

    @property
    def code(self) -> str:
        """A short machine-readable class name for job records and metrics."""
        return "api_error"


class NothingCreatedError(ApiError):
    """Certainly nothing was created or billed (429, connect failure, 5xx on a read): retry.

    `retry_after_s` is the server's Retry-After when it sent one; it is obeyed exactly.
    """

    retry_after_s: float | None = None


class RefusedError(ApiError):
    """The API refused the request (4xx, `success: false`): repeating it will not help."""


class CredentialsRefusedError(RefusedError):
    """The credentials were refused: the job is not at fault, the configuration is."""


class OutcomeUnknownError(ApiError):
    """A paid call may or may not have happened: settled by looking, never by a blind repeat."""


# --- the time ports -----------------------------------------------------------------------


class Clock(Protocol):
    """Seconds on the clock the job timestamps use; tests pass a clock they advance."""

    def __call__(self) -> float:
        """Now, in seconds."""
        ...


class Sleep(Protocol):
    """Waits for some seconds; tests pass one that advances their fake clock instead."""

    def __call__(self, seconds: float, /) -> Awaitable[None]:
        """Return after `seconds` (or when the caller's scope is cancelled)."""
        ...


# --- the API port -------------------------------------------------------------------------


class ExportApi(Protocol):
    """The billed calls of both API generations, and the unbilled draft of the two-step flow."""

    async def export_v3(
        self, body: dict[str, Any], *, name: str, webhook_url: str | None = None
    ) -> str:
        """Create and export in one call; returns the project id."""
        ...

    async def export_legacy(self, scenes: list[dict[str, Any]]) -> str:
        """Export changed scenes of a saved project; returns the key to poll."""
        ...

    async def create_draft_v3(self, body: dict[str, Any], *, name: str) -> str:
        """Create a v3 project without exporting it (not billed); returns its id."""
        ...

    async def export_project_v3(self, project_id: str, *, webhook_url: str | None = None) -> str:
        """Export an existing v3 project (billed); returns its id."""
        ...

    async def template_modify(
        self,
        template_id: str,
        updates: dict[str, str],
        *,
        name: str,
        webhook_url: str | None = None,
    ) -> str:
        """Create from a server-side template with `updates` and export (billed); its id."""
        ...


class ProgressApi(Protocol):
    """Reading a render's progress in either API generation."""

    async def progress_v3(self, project_id: str) -> Progress:
        """Progress of a v3 export."""
        ...

    async def progress_legacy(self, key: str) -> Progress:
        """Progress of a legacy export."""
        ...


class LookupApi(Protocol):
    """Settling an uncertain export: by its name (one-step) or by its project (two-step)."""

    async def find_project_by_name(self, name: str) -> ProjectSummary | None:
        """The project created under `name`, or None."""
        ...

    async def get_project_v3(self, project_id: str) -> ProjectState:
        """One v3 project with its export status."""
        ...


class RenderApi(ExportApi, ProgressApi, LookupApi, Protocol):
    """Everything the pipeline asks of AI Studios (the client, or a fake of the cloud)."""


# --- the store port -----------------------------------------------------------------------


class JobStore(Protocol):
    """The part of the store the job loops use; `OwnedJobs` adds this worker's fences to it."""

    async def get_job(self, job_id: str) -> Job | None:
        """Read one job."""
        ...

    async def jobs_in_states(self, states: Collection[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of these states, oldest first."""
        ...

    async def transition(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        update: JobUpdate | None = None,
        outbox: Sequence[NewOutboxMessage] = (),
    ) -> Job:
        """Move a job (compare-and-set on its state and this worker's claim)."""
        ...

    async def update_job(self, job_id: str, update: JobUpdate) -> Job:
        """Change fields without a state change (under this worker's claim)."""
        ...

    async def spend_or_hold(
        self,
        job_id: str,
        caps: Sequence[SpendCap],
        update: JobUpdate,
        announce: Callable[[Job, SpendCap], Sequence[NewOutboxMessage]],
    ) -> Job:
        """`mapped -> submitting` with a spend record, or `-> held` when a cap is full (atomic)."""
        ...

    async def spend_counts(self, since: float) -> dict[str, int]:
        """Billed exports recorded since `since`, per route."""
        ...

    async def cached_render(self, render_key: str, since: float) -> Job | None:
        """The latest exported job with this render key ready since `since`."""
        ...

    async def save_render_estimate(self, key: str, seconds: float) -> None:
        """Keep the learned render time of `key` across restarts."""
        ...

    async def render_estimates(self) -> dict[str, float]:
        """Every learned render time by key."""
        ...


class UrlProbe(Protocol):
    """Whether a video URL still downloads (the vendor documents no URL lifetime)."""

    async def downloads(self, url: str) -> bool:
        """True when the URL answers a HEAD (or a one-byte range GET) with success."""
        ...
