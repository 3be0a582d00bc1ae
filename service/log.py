"""The only structlog configuration: one event per line, secrets never printed.

Redaction runs last before rendering, so no processor or call site can leak a secret by
accident: keys that name secrets are masked, and registered secret values are masked wherever
they appear in a string.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO, cast
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import orjson
import structlog

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|authorization|signature|api_key|user_key|hmac)", re.IGNORECASE
)
_secret_values: set[str] = set()
_stdlib_handlers: list[logging.Handler] = []
_PLAIN = frozenset({int, float, bool})
_generation = 0
"""Bumped by every `configure_logging`: a cached logger built under an older one is rebuilt."""


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember configured secret values so they are masked even inside free text."""
    _secret_values.update(v for v in values if v and len(v) >= 4)  # noqa: PLR2004 - too short to mask safely


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    """Event keys are a small fixed set of names in code: each is matched against the regex once."""
    return key != "event" and _SECRET_KEY.search(key) is not None


def _mask(value: Any) -> Any:  # noqa: ANN401 - log values are of any type
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        if not _secret_values:
            return value
        for secret in _secret_values:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def masked(value: Any) -> Any:  # noqa: ANN401 - any JSON-like value
    """A copy with secret-named keys and known secret values masked, as the logs show it."""
    return _mask(value)


_SECRET_PARAM = re.compile(r"(secret|token|passw|pwd|key|sig|auth|credential|hmac)", re.IGNORECASE)
"""Query parameter names whose value is masked: broader than log keys, as URLs are few."""


def printable_url(url: str) -> str:
    """`url` as the service prints it (start-up summary, `preview`): never a password or token.

    The whole user information goes, the user name too: a lone name cannot be told from a
    token (`https://TOKEN@host`), and the host, port and path already say which store or API
    is meant. A query parameter whose name says secret (libpq's `password`, `api_key`, ...)
    keeps its name with the value masked; the fragment is dropped. A URL that does not parse
    is not printed at all.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(_printable_param(param) for param in parts.query.split("&"))
    if (netloc, query, parts.fragment) == (parts.netloc, parts.query, ""):
        return url  # nothing to hide: printed exactly as configured
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def _printable_param(param: str) -> str:
    name, equals, _ = param.partition("=")
    if equals and _SECRET_PARAM.search(unquote_plus(name)):
        return f"{name}={REDACTED}"
    return param


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:  # noqa: ANN401 - structlog processor signature
    """Mask secret-named keys and known secret values in every log event."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif value is not None and type(value) not in _PLAIN:
            event_dict[key] = _mask(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:  # noqa: ANN401
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(
    level: str = "info", fmt: str = "console", stream: TextIO | None = None
) -> None:
    """Configure structlog once for the process (the CLI calls this before anything logs)."""
    global _generation  # noqa: PLW0603 - the one process-wide configuration
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    _route_stdlib_logging(level, stream or sys.stderr, shared, renderer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _generation += 1


def _route_stdlib_logging(level: str, stream: TextIO, shared: list[Any], renderer: Any) -> None:  # noqa: ANN401 - structlog renderers have no common type
    """Send library loggers (aiomqtt, aiohttp, asyncio) through the same processors.

    With `log_format = "json"` every line the process writes must be one JSON object; left
    alone, aiomqtt's "There are N pending publish calls." and asyncio's own errors came out as
    plain text. Warnings go the same way.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for previous in _stdlib_handlers:
        root.removeHandler(previous)
    _stdlib_handlers[:] = [handler]
    root.addHandler(handler)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(numeric)
    # aiohttp writes one access line per request at info: under webhook load that is a line
    # per delivery, which the intake keeps for debug (README, Logs).
    access = logging.INFO if numeric <= logging.DEBUG else logging.WARNING
    logging.getLogger("aiohttp.access").setLevel(access)
    logging.captureWarnings(capture=True)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger bound to its component name, assembled once per `configure_logging`.

    structlog's own lazy logger assembles a new logger (wrapper, context, output) on every
    call unless it is cached for good, and a logger cached for good ignores a later
    `configure_logging`. On the webhook path that assembly cost more than the call itself,
    even for a debug line that is then dropped, so this one keeps what it assembled until
    the configuration changes. `capture_logs` swaps processors in place and still sees every
    line.
    """
    return cast("structlog.stdlib.BoundLogger", _CachedLogger(name))


class _CachedLogger:
    """Forwards to a logger assembled for the current configuration generation."""

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, attribute: str) -> Any:  # noqa: ANN401 - whatever the logger has
        if self._generation != _generation:
            self._bound = structlog.get_logger(component=self._name).bind()
            self._generation = _generation
        return getattr(self._bound, attribute)
