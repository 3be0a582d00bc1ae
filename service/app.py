"""Composition root: builds every part, runs them in one task group, stops them in order.

Start order: store -> API client (or the simulator) -> templates -> pipeline and sender -> HTTP
site bound -> MQTT subscribed -> "ready". Stop order on the shutdown trigger: intake first (no
new acks), then, within the grace period, the pipeline drains (exports under way commit their
outcome) alongside the outbox sender (announcements under way are sent and marked, so a restart
does not send them again), then everything is cancelled and the store is closed under a shield
so the last commits land.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog
from aiohttp import web

from service.admin import AdminApi, ReadinessCheck
from service.aistudios.client import AIStudiosClient
from service.aistudios.connect import connect
from service.aistudios.errors import AIStudiosError
from service.aistudios.simulator import Simulator, SimulatorKnobs
from service.budget_config import PipelineBudget, budget_limits
from service.catalog import Catalog, load_catalog
from service.config import Config, ConfigError
from service.console.server import PREFIX as CONSOLE_PREFIX
from service.console.server import Console
from service.ingress.leadership import ReaderElection
from service.ingress.mqtt import MqttIngress
from service.ingress.webhooks import webhook_routes
from service.intake import StoreIntake
from service.jobs.pipeline import JobPipeline
from service.jobs.prepare import Preparer
from service.jobs.ratelimit import RequestGate
from service.jobs.submitter import RenderCache
from service.log import get_logger
from service.metrics import Metrics
from service.model import Job, JobState, NewOutboxMessage
from service.notify.build import build_notifiers, outbox_rows_for
from service.notify.probe import HttpProbe
from service.notify.sender import Notifier, OutboxSender
from service.store.base import StaleTransitionError, Store, StoreUnavailableError
from service.store.factory import store_from_url
from service.store.postgres import OUTBOX_CLAIM_S, PostgresStore
from service.summary import startup_summary
from service.template_refresh import ReloadRequests, TemplateRefresher, reload_routes

log = get_logger("app")
human_log = structlog.get_logger()
"""Sentences for a person at a console, without the component key the event lines carry."""

DEDUPE_RETENTION_S = 8 * 24 * 3600  # dedupe keys are kept at least 7 days; one day of margin
PURGE_INTERVAL_S = 3600
API_CHECK_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class Running:
    """What a started service tells its starter (tests use the URLs)."""

    http_url: str
    api_url: str
    simulator: Simulator | None
    store: Store
    pipeline: JobPipeline
    templates: TemplateRefresher | None = None


async def _serve_http(
    cfg: Config,
    routes: Sequence[web.RouteDef],
    subapps: Mapping[str, web.Application],
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    app = web.Application(client_max_size=cfg.http.max_body_bytes + 1)
    app.add_routes(routes)
    for prefix, subapp in subapps.items():
        app.add_subapp(prefix, subapp)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=cfg.service.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, cfg.http.host, cfg.http.port)
    try:
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("http.listening", url=url)
        task_status.started(url)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


async def _purge_dedupe(store: Store) -> None:
    while True:
        try:
            purged = await store.purge_dedupe(time.time() - DEDUPE_RETENTION_S)
            if purged:
                log.info("store.purged", events=purged)
        except StoreUnavailableError as exc:
            log.warning("store.purge_failed", reason=str(exc))
        await anyio.sleep(PURGE_INTERVAL_S)


async def run_service(
    cfg: Config,
    *,
    shutdown: anyio.Event,
    simulator_knobs: SimulatorKnobs | None = None,
    reload_requests: ReloadRequests | None = None,
    task_status: anyio.abc.TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until `shutdown` is set (signals in production, an event in tests).

    `reload_requests` is how SIGHUP reaches the saved-template refresher and the caps.
    """
    if cfg.aistudios.uses_simulator:
        log.warning(
            "aistudios.simulator",
            message="no AI Studios credentials configured: exports go to the built-in simulator",
        )
    cfg.service.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(cfg.service.instance_id)
    store = store_from_url(cfg.store.url, instance=cfg.service.instance_id)
    await store.open()
    try:
        async with AsyncExitStack() as stack:
            gate = RequestGate(
                cfg.aistudios.request_rate_ceiling,
                time.monotonic,
                hard_cap=cfg.aistudios.max_requests_per_second,
            )
            api = await stack.enter_async_context(
                connect(
                    cfg, knobs=simulator_knobs, before_request=gate, on_call=metrics.on_api_call
                )
            )
            catalog, problems = await load_catalog(cfg, api.client)
            if problems:
                raise ConfigError(problems)
            notifiers = await stack.enter_async_context(
                build_notifiers(cfg, store, (api.api_url, api.legacy_url))
            )
            refresher = TemplateRefresher(cfg, catalog, api.client, requests=reload_requests)
            probe = HttpProbe()
            stack.push_async_callback(probe.aclose)
            parts = _Parts(
                cfg, store, api.client, gate, catalog, notifiers, metrics, refresher, probe
            )
            await parts.run(api.simulator, api.api_url, shutdown, task_status)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
        log.info("service.stopped")


def _mark_notified(store: Store) -> Callable[[str], Awaitable[None]]:
    async def mark(job_id: str) -> None:
        # A failed job's announcement was delivered too: it stays failed (stale transition).
        with contextlib.suppress(StaleTransitionError):
            await store.transition(job_id, {JobState.READY}, JobState.NOTIFIED)

    return mark


def _readiness_checks(
    store: Store,
    client: AIStudiosClient,
    ingress: MqttIngress | None,
    election: ReaderElection | None,
) -> dict[str, ReadinessCheck]:
    """The /readyz checks, by the name they are reported under."""
    api_ok_until = 0.0

    async def store_check() -> str | None:
        try:
            await store.ping()
        except StoreUnavailableError as exc:
            return str(exc) or "store unavailable"
        return None

    async def api_check() -> str | None:
        nonlocal api_ok_until
        if time.monotonic() < api_ok_until:
            return None
        try:
            authenticated = await client.confirm_auth()
        except AIStudiosError as exc:
            return f"AI Studios unreachable: {exc.message}"
        if not authenticated:
            return "AI Studios refused the credentials"
        api_ok_until = time.monotonic() + API_CHECK_TTL_S
        return None

    async def mqtt_check() -> str | None:
        return _mqtt_problem(ingress, election)

    return {"store": store_check, "aistudios": api_check, "mqtt": mqtt_check}


def _mqtt_problem(ingress: MqttIngress | None, election: ReaderElection | None) -> str | None:
    """Why MQTT intake is not ready; an instance standing by for the reader role reads nothing."""
    if ingress is None or ingress.connected:
        return None
    role = None if election is None else election.role
    if role == "standby":
        return None
    if election is not None and role is None:
        return "MQTT reader not elected yet"
    return "MQTT broker not connected"


@dataclass
class _Parts:
    cfg: Config
    store: Store
    client: AIStudiosClient
    gate: RequestGate
    catalog: Catalog
    notifiers: Mapping[str, Notifier]
    metrics: Metrics
    refresher: TemplateRefresher
    probe: HttpProbe | None = None

    def outbox_for(self, job: Job, event_type: str) -> Sequence[NewOutboxMessage]:
        return outbox_rows_for(self.cfg, job, event_type)

    def render_cache(self) -> RenderCache | None:
        """The render cache, when any route sets `cache_seconds`."""
        windows = {r.name: r.cache_seconds for r in self.cfg.routes if r.cache_seconds}
        if not windows or self.probe is None:
            return None

        def on_hit(job: Job) -> None:
            self.metrics.cache_hits.labels(route=job.route).inc()

        return RenderCache(
            seconds_for=lambda job: windows.get(job.route), probe=self.probe, on_hit=on_hit
        )

    def template_of(self, job: Job) -> str:
        """The template a job renders: its render time is learned per template."""
        route = self.catalog.routes.get(job.route)
        return route.config.template if route is not None else job.route

    def build(
        self,
    ) -> tuple[JobPipeline, OutboxSender, StoreIntake, MqttIngress | None, ReaderElection | None]:
        cfg, store = self.cfg, self.store
        pipeline = JobPipeline(
            store=store,
            api=self.client,
            gate=self.gate,
            settings=cfg.aistudios,
            prepare=Preparer(cfg, self.catalog, store, self.outbox_for),
            outbox_for=self.outbox_for,
            public_url=cfg.http.public_url,
            on_ready=self.metrics.observe_ready,
            estimate_key=self.template_of,
            budget=budget_limits(cfg),
            cache=self.render_cache(),
            owner_id=cfg.service.instance_id,
            lease_s=cfg.service.lease_s,
        )
        sender = OutboxSender(
            store,
            self.notifiers,
            clock=time.time,
            rng=random.Random(),  # noqa: S311 - retry jitter, not cryptography
            on_job_delivered=_mark_notified(store),
            claim_renew_s=OUTBOX_CLAIM_S / 3,
            settle_every_s=2 * OUTBOX_CLAIM_S if isinstance(store, PostgresStore) else None,
        )
        store.add_outbox_listener(sender.wake)
        intake = StoreIntake(
            store,
            self.catalog,
            on_new_jobs=pipeline.notify_new_jobs,
            metrics=self.metrics,
            sources=cfg.sources,
        )
        mqtt_sources = [s for s in cfg.sources if s.kind == "mqtt"]
        ingress = election = None
        if mqtt_sources and cfg.mqtt is not None:
            ingress = MqttIngress(config=cfg.mqtt, sources=mqtt_sources, intake=intake)
            # Instances sharing the store read MQTT one at a time (one broker session).
            election = ReaderElection(
                store,
                client_id=cfg.mqtt.client_id,
                read=ingress.run,
                check_s=cfg.mqtt.reader_check_s,
            )
        return pipeline, sender, intake, ingress, election

    async def run(
        self,
        simulator: Simulator | None,
        api_url: str,
        shutdown: anyio.Event,
        task_status: anyio.abc.TaskStatus[Running],
    ) -> None:
        cfg = self.cfg
        pipeline, sender, intake, ingress, election = self.build()
        checks = _readiness_checks(self.store, self.client, ingress, election)
        budget = PipelineBudget(pipeline, cfg)
        # SIGHUP re-reads the spending caps as well as the saved templates.
        self.refresher.requests.add_listener(budget.request_reload)
        admin = AdminApi(
            store=self.store,
            metrics=self.metrics,
            checks=checks,
            on_callback=pipeline.on_callback,
            on_retry=pipeline.notify_new_jobs,
            admin_token=cfg.http.admin_token,
            replay=intake.replay,
            budget=budget,
            roles=None if election is None else lambda: {"mqtt": election.role or "electing"},
        )
        console = Console(
            store=self.store,
            cfg=cfg,
            templates=self.catalog.templates,
            checks=checks,
            on_retry=pipeline.notify_new_jobs,
            replay=intake.replay,
        )
        routes = [
            *webhook_routes(
                sources={s.name: s for s in cfg.sources},
                intake=intake,
                max_body_bytes=cfg.http.max_body_bytes,
                body_timeout_s=cfg.http.body_timeout_s,
            ),
            *admin.routes(),
            *reload_routes(self.refresher, cfg.http.admin_token),
        ]
        async with anyio.create_task_group() as workers:
            await workers.start(pipeline.run, name="jobs")
            await workers.start(sender.run, name="outbox")
            if isinstance(self.store, PostgresStore):
                # Other instances' commits wake this one's loops (LISTEN/NOTIFY).
                self.store.add_work_listener(pipeline.notify_new_jobs)
                await workers.start(self.store.listen, name="store-notifications")
            workers.start_soon(_purge_dedupe, self.store, name="dedupe-purge")
            workers.start_soon(self.refresher.run, name="template-refresh")
            workers.start_soon(budget.follow_reload_requests, name="budget-reload")
            async with anyio.create_task_group() as intake_group:
                # The trigger may come while intake is still starting (a broker that is down):
                # it must stop the start-up as well as a running service.
                intake_group.start_soon(_stop_intake_on, shutdown, intake_group, name="shutdown")
                http_url = await intake_group.start(
                    _serve_http, cfg, routes, {CONSOLE_PREFIX: console.app()}, name="http"
                )
                if election is not None:
                    await intake_group.start(election.run, name="mqtt-ingress")
                log.info("service.ready", http=http_url, simulator=simulator is not None)
                if cfg.service.log_format == "console":
                    summary = startup_summary(
                        cfg, http_url=http_url, api_url=api_url, simulator=simulator is not None
                    )
                    human_log.info(summary)
                task_status.started(
                    Running(http_url, api_url, simulator, self.store, pipeline, self.refresher)
                )
            with anyio.move_on_after(cfg.service.shutdown_grace_s):
                async with anyio.create_task_group() as drains:
                    drains.start_soon(pipeline.drain, name="drain-jobs")
                    drains.start_soon(sender.drain, name="drain-outbox")
            workers.cancel_scope.cancel()


async def _stop_intake_on(shutdown: anyio.Event, intake: anyio.abc.TaskGroup) -> None:
    await shutdown.wait()
    log.info("service.stopping")
    intake.cancel_scope.cancel()


async def run_until_signalled(cfg: Config) -> None:
    """`studiohook serve`: SIGTERM or SIGINT is the shutdown trigger, SIGHUP a reload.

    The reload fetches saved templates again and re-reads the spending caps.
    """
    shutdown = anyio.Event()
    reload_requests = ReloadRequests()

    async def wait_for_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("service.signal", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    reload_requests.request()
                    continue
                shutdown.set()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_signal, name="signals")
        await run_service(cfg, shutdown=shutdown, reload_requests=reload_requests)
        tg.cancel_scope.cancel()
