"""Pick the store engine from the `[store] url` of the configuration."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from service.store.base import Store
from service.store.postgres import PostgresStore
from service.store.sqlite import SQLiteStore

_SQLITE_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> Path:
    """The file a `sqlite:///` URL names, resolved now so a later chdir cannot move it.

    `sqlite:////abs/db` is absolute and `sqlite:///db` relative to the working directory: the
    SQLAlchemy convention, and what `config.py` produces from `state_dir`.
    """
    if not url.startswith(_SQLITE_PREFIX) or url == _SQLITE_PREFIX:
        raise ValueError(f"not a sqlite:///PATH URL: {url!r}")
    path = Path(url.removeprefix(_SQLITE_PREFIX))
    return path if path.is_absolute() else Path.cwd() / path


def store_from_url(
    url: str, *, clock: Callable[[], float] = time.time, instance: str | None = None
) -> Store:
    """Build (not open) the store a URL names; unknown engines are ValueError.

    `postgresql://user:pass@host/db` (or `postgres://`) is the shared engine several instances
    can run on; the URL is handed to libpq as it is, so its query parameters (sslmode, ...) work.
    `instance` (default: the host name) claims the announcements this process sends.
    """
    if url.startswith(_SQLITE_PREFIX):
        return SQLiteStore(sqlite_path(url), clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, clock=clock, outbox_claimant=instance or socket.gethostname())
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://")
