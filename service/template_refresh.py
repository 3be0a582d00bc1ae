"""Saved projects used as templates are fetched again on reload and when they grow old.

A project saved in the editor is the user's to change: after editing it they send SIGHUP or
run `studiohook reload`, or let `refresh_seconds` pick the change up. A re-fetched project
replaces the one in use only if every route on it still finds what it addresses; otherwise the
old one stays and the reason is logged, so a half-edited project never makes a paid video with
the wrong content. Jobs already mapped keep the body they were mapped with.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import orjson
from aiohttp import web

from service.aistudios.errors import AIStudiosError
from service.catalog import (
    Catalog,
    SavedProjectReader,
    fetch_saved_project,
    routes_problems_for,
)
from service.config import Config, TemplateConfig
from service.log import get_logger
from service.mapping.templates import TemplateError

log = get_logger("templates")

OK = "ok"


@dataclass(frozen=True, slots=True)
class Freshness:
    """When a saved template was last fetched and how long it may be used (None: until reload)."""

    fetched_at: float
    refresh_s: float | None


def due_for_refresh(freshness: Mapping[str, Freshness], now: float) -> list[str]:
    """The saved templates whose `refresh_seconds` have passed since their last fetch."""
    return [
        name
        for name, f in freshness.items()
        if f.refresh_s is not None and now >= f.fetched_at + f.refresh_s
    ]


def next_refresh_at(freshness: Mapping[str, Freshness]) -> float:
    """When the next saved template falls due; infinity when none has a `refresh_seconds`."""
    times = [f.fetched_at + f.refresh_s for f in freshness.values() if f.refresh_s is not None]
    return min(times, default=math.inf)


class ReloadRequests:
    """SIGHUP (and anything else) asks for a reload: the refresher waits on it, others listen.

    The refresher consumes requests (`take`, `wait`); `add_listener` callbacks (the spending
    caps' reload) are called on every request and must return at once.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` on every later request."""
        self._listeners.append(listener)

    def request(self) -> None:
        """Ask for every saved template to be fetched again, and each listener to reload, soon."""
        self._event.set()
        for listener in self._listeners:
            listener()

    def take(self) -> bool:
        """Consume a pending request; True when there was one."""
        if not self._event.is_set():
            return False
        self._event = anyio.Event()
        return True

    async def wait(self) -> None:
        """Until a request is pending."""
        await self._event.wait()


class TemplateRefresher:
    """One loop owns re-fetching every saved template (v3 and legacy)."""

    def __init__(
        self,
        cfg: Config,
        catalog: Catalog,
        reader: SavedProjectReader,
        *,
        requests: ReloadRequests | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._catalog = catalog
        self._reader = reader
        self.requests = requests or ReloadRequests()
        self._clock = clock
        self._saved: dict[str, TemplateConfig] = {
            t.name: t for t in cfg.templates if t.project_id is not None
        }
        now = clock()  # the catalog fetched each one at start-up
        self.freshness = {
            name: Freshness(now, t.refresh_seconds) for name, t in self._saved.items()
        }
        self._lock = anyio.Lock()

    async def run(self) -> None:
        """Forever: wait for a reload request or the next expiry, then fetch what is due."""
        while True:
            wait_s = next_refresh_at(self.freshness) - self._clock()
            with anyio.move_on_after(max(wait_s, 0.0)):
                await self.requests.wait()
            if self.requests.take():
                await self.refresh(list(self._saved))
            else:
                await self.refresh(due_for_refresh(self.freshness, self._clock()))

    async def refresh(self, names: list[str]) -> dict[str, str]:
        """Fetch these saved templates again; each one's outcome, "ok" or the reason kept old."""
        outcomes: dict[str, str] = {}
        async with self._lock:
            for name in names:
                outcomes[name] = await self._refresh_one(self._saved[name])
                self.freshness[name] = Freshness(self._clock(), self._saved[name].refresh_seconds)
        return outcomes

    async def _refresh_one(self, template: TemplateConfig) -> str:
        try:
            document = await fetch_saved_project(self._reader, template)
        except (AIStudiosError, TemplateError) as exc:
            reason = exc.message if isinstance(exc, AIStudiosError) else str(exc)
            log.warning("template.refresh_failed", template=template.name, reason=reason)
            return f"kept the previous version: could not be read: {reason}"
        problems = routes_problems_for(self._cfg, template.name, document)
        if problems:
            reasons = "; ".join(str(p) for p in problems)
            log.error("template.refresh_rejected", template=template.name, problems=reasons)
            return f"kept the previous version: {reasons}"
        self._catalog.replace_template(template.name, document)
        log.info("template.refreshed", template=template.name, project_id=template.project_id)
        return OK


def reload_routes(refresher: TemplateRefresher, admin_token: str | None) -> list[web.RouteDef]:
    """`POST /templates/reload`: what `studiohook reload` calls; answers each template's outcome."""

    async def reload(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if admin_token and not hmac.compare_digest(given.encode(), admin_token.encode()):
            return _json({"error": "admin token required"}, 401)
        outcomes = await refresher.refresh(list(refresher.freshness))
        return _json({"templates": outcomes}, 200)

    return [web.post("/templates/reload", reload)]


def _json(data: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
