"""Typed AI Studios errors: what the caller may do next depends only on the class.

The API documents no error bodies and no rate limits, so the class is decided from what is
certain: the HTTP status, whether the request could have reached the server, and the
documented `success: false`. Each class is also one of the jobs core's own error kinds
(`service.jobs.ports`): the translation happens here, at the adapter's edge.
"""

from __future__ import annotations

from service.jobs.ports import (
    ApiError,
    CredentialsRefusedError,
    NothingCreatedError,
    OutcomeUnknownError,
    RefusedError,
)


class AIStudiosError(ApiError):
    """Base of every error the client raises."""

    def __init__(self, message: str, *, status: int | None = None, endpoint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.endpoint = endpoint

    @property
    def code(self) -> str:
        """A short machine-readable class name for job records and metrics."""
        return "aistudios_error"


class RetryableError(AIStudiosError, NothingCreatedError):
    """Nothing was created: 429, 5xx on a read, a connect failure, a read timeout on a read.

    `retry_after_s` is the server's Retry-After when it sent one; callers honour it exactly.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        endpoint: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status=status, endpoint=endpoint)
        self.retry_after_s = retry_after_s

    @property
    def code(self) -> str:
        """Also the `on_call` outcome label, so metrics and job records agree."""
        return "retryable"


class PermanentError(AIStudiosError, RefusedError):
    """The request was refused (4xx, `success: false`): repeating it will not help."""

    @property
    def code(self) -> str:
        """Also the `on_call` outcome label, so metrics and job records agree."""
        return "permanent"


class AuthError(PermanentError, CredentialsRefusedError):
    """Credentials were refused even after one token refresh."""

    @property
    def code(self) -> str:
        """Also the `on_call` outcome label, so metrics and job records agree."""
        return "auth"


class AmbiguousError(AIStudiosError, OutcomeUnknownError):
    """A create may or may not have happened (response lost, timeout after sending, 5xx).

    Never answered by a second POST: the job goes to `reconcile`, which looks for the project
    by its export name.
    """

    @property
    def code(self) -> str:
        """Also the `on_call` outcome label, so metrics and job records agree."""
        return "ambiguous"
