"""The `studiohook` command line: parsing and printing only; the work lives in the service."""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from service import cli_events
from service.aistudios.client import AIStudiosClient
from service.aistudios.connect import connect
from service.aistudios.paid_requests import TEMPLATE_MODIFY_API, paid_request
from service.aistudios.simulator import SimulatorKnobs, run_simulator
from service.budget_config import budget_limits
from service.catalog import load_catalog
from service.cli_tables import job_table, jobs_table
from service.config import Config, ConfigError, config_path, load_config, read_config
from service.eventloop import loop_options, tune_collector
from service.intake import decide, route_context
from service.jobs.cache import render_key
from service.jobs.prepare import coalesce_key_for, export_request
from service.log import configure_logging, printable_url, register_secrets
from service.mapping.render import MappingError
from service.mapping.routes import CompiledRoute, export_name
from service.model import RawEvent, job_id_for
from service.outlook import EventFacts, store_outlook

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
WIDE_CONSOLE_WIDTH = 10_000
FLOWS = {
    "v3": "v3 export",
    "legacy": "legacy export of a saved project",
    TEMPLATE_MODIFY_API: "server-side template",
}


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(config_path(args.config))
    a = cfg.aistudios
    register_secrets([a.api_key, a.app_id, a.user_key, cfg.http.admin_token])
    register_secrets(s for src in cfg.sources for s in src.secrets)
    register_secrets(n.secret for n in cfg.notify)
    if cfg.mqtt is not None:
        register_secrets([cfg.mqtt.password])
    return cfg


def _print_problems(problems: Sequence[object]) -> None:
    for problem in problems:
        err.print(f"[red]✗[/red] {escape(str(problem))}", markup=True)


# --- check / preview ------------------------------------------------------------------------


async def _check(args: argparse.Namespace) -> int:
    cfg, problems = read_config(config_path(args.config))
    saved = [t for t in cfg.templates if t.project_id or t.layout_project_id]
    if saved and not cfg.aistudios.uses_simulator:
        # Reads only (free): saved projects are checked against what is really there.
        async with connect(cfg) as api:
            catalog, catalog_problems = await load_catalog(cfg, api.client)
    else:
        if saved:
            err.print("no AI Studios credentials: saved projects are checked for syntax only")
        catalog, catalog_problems = await load_catalog(cfg)
    problems = [*problems, *catalog_problems]
    if problems:
        _print_problems(problems)
        err.print(f"{len(problems)} problem(s) in {cfg.path}")
        return EXIT_PROBLEMS
    out.print(
        f"ok: {cfg.path}: {len(cfg.sources)} sources, {len(catalog.templates)} templates, "
        f"{len(catalog.routes)} routes, {len(cfg.notify)} notify targets"
    )
    out.print(f"spending caps: {_caps_summary(cfg)}")
    out.print(f"render cache and coalescing: {_reuse_summary(cfg)}")
    return EXIT_OK


def _reuse_summary(cfg: Config) -> str:
    """Each route's render cache window and coalescing key, as `check` reports them."""
    parts = []
    for route in cfg.routes:
        if route.cache_seconds is not None:
            parts.append(f"{route.name} reuses a video for {route.cache_seconds:g} s")
        if route.coalesce_key is not None and route.coalesce_seconds > 0:
            window = f"{route.coalesce_seconds:g} s"
            parts.append(f"{route.name} coalesces by {route.coalesce_key} within {window}")
    return "; ".join(parts) or "none (every event is exported)"


def _caps_summary(cfg: Config) -> str:
    """The configured spending caps in one line, as `check` reports them."""
    caps = [
        f"{count}/{period}"
        for count, period in (
            (cfg.budget.exports_per_day, "day"),
            (cfg.budget.exports_per_month, "month"),
        )
        if count is not None
    ]
    caps += [
        f"{route.name} {route.max_exports_per_day}/day"
        for route in cfg.routes
        if route.max_exports_per_day is not None
    ]
    return ", ".join(caps) or "none (every export is sent)"


def _read_event(path: Path, source: str) -> tuple[RawEvent, bytes]:
    body = path.read_bytes()
    headers_file = path.with_name(path.name.removesuffix(".json") + ".headers.json")
    headers: dict[str, str] = {}
    if headers_file.is_file():
        headers = {k.lower(): str(v) for k, v in orjson.loads(headers_file.read_bytes()).items()}
    payload = orjson.loads(body)
    topic = headers.pop("x-mqtt-topic", None)
    return RawEvent(source=source, payload=payload, headers=headers, topic=topic), body


@dataclass(frozen=True)
class _Rendered:
    """The export an event file becomes, and what the guard rails need to judge it."""

    api: str
    body: dict[str, Any]
    name: str
    template: Any
    route: CompiledRoute
    job_id: str
    context: dict[str, Any]


async def _render(
    args: argparse.Namespace, cfg: Config, client: AIStudiosClient | None, job_id: str | None
) -> _Rendered:
    """The export an event file becomes; `job_id` None means the id the service would give it."""
    catalog, problems = await load_catalog(cfg, client)
    if problems:
        raise ConfigError(list(problems))
    route = catalog.routes.get(args.route)
    if route is None:
        raise SystemExit(f"no route named {args.route!r} (have: {', '.join(catalog.routes)})")
    source = cfg.source(args.source or route.config.source)
    if source is None:
        raise SystemExit(f"no source named {args.source!r}")
    template_name = route.config.template
    if template_name not in catalog.templates and template_name not in catalog.server_templates:
        raise SystemExit(
            f"template {template_name!r} is a saved project: preview reads it from AI Studios, "
            "which needs credentials ([aistudios] api_key, or app_id and user_key)"
        )
    raw, body = _read_event(Path(args.event), source.name)
    # The same identity the service derives at intake, so the name is the one it would use.
    identity = decide(catalog, (), source=source, raw=raw, body=body)
    if identity.failures:
        raise SystemExit(f"the service would dead-letter this event: {identity.reason}")
    handled = catalog.handled(route, source.kind, raw, None)
    context = route_context(
        handled,
        route=route.config.name,
        source=source.name,
        event_id=identity.event_id,
        event_type=handled.event_type or raw.topic or "event",
    )
    job_id = job_id or job_id_for(source.name, identity.dedupe_key, route.config.name)
    name = export_name(route, context, job_id)
    api, request = export_request(catalog, route, context, name)
    template = catalog.templates.get(template_name)
    return _Rendered(api, request, name, template, route, job_id, context)


async def _preview_render(args: argparse.Namespace, cfg: Config) -> _Rendered:
    """Render locally: AI Studios is asked only for a saved project (a free read, with credentials).

    `preview` is not offline: it also reads the store and may check a cached video's URL.
    """
    saved = any(t.project_id for t in cfg.templates)
    if not saved or cfg.aistudios.uses_simulator:
        return await _render(args, cfg, None, None)
    async with connect(cfg) as api:
        return await _render(args, cfg, api.client, None)


async def _preview(args: argparse.Namespace) -> int:
    cfg = _load(args)
    try:
        rendered = await _preview_render(args, cfg)
    except MappingError as exc:
        err.print(f"mapping error: {exc}")
        return EXIT_PROBLEMS
    api, body, name, template = rendered.api, rendered.body, rendered.name, rendered.template
    a = cfg.aistudios
    webhook = f"{cfg.http.public_url}/callbacks/<job_id>/<token>" if cfg.http.public_url else None
    request = paid_request(
        api,
        body,
        name=name,
        base_url=a.base_url,
        legacy_base_url=a.legacy_base_url,
        webhook_url=webhook,
    )
    out.print(f"# {request.method} {request.url}  ({FLOWS.get(api, api)}), name {name!r}")
    text = orjson.dumps(request.body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    out.print(text.decode(), markup=False)
    if template is None:
        out.print("# the template is kept by AI Studios: it applies `updates` to it")
    else:
        before = orjson.dumps(template, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        diff = difflib.unified_diff(
            before.decode().splitlines(),
            text.decode().splitlines(),
            "template",
            "export",
            lineterm="",
            n=1,
        )
        out.print("# diff against the template")
        for line in diff:
            out.print(line, markup=False)
    out.print(f"# guard rails right now ({printable_url(cfg.store.url)}, read-only)")
    for line in await _guard_rails(cfg, rendered):
        out.print(f"#   {line}", markup=False)
    return EXIT_OK


async def _guard_rails(cfg: Config, rendered: _Rendered) -> list[str]:
    """The render cache, coalescing and caps' answers for this event, from the store as it is."""
    route = rendered.route
    facts = EventFacts(
        route=route.config.name,
        job_id=rendered.job_id,
        render_key=render_key(rendered.api, rendered.body),
        coalesce_key=coalesce_key_for(route, rendered.context),
        cache_seconds=route.config.cache_seconds,
        coalesce_seconds=route.config.coalesce_seconds,
    )
    return await store_outlook(cfg.store.url, facts, budget_limits(cfg), time.time())


# --- submit ------------------------------------------------------------------------------


async def _download(url: str, dest: Path) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        data = await response.read()
    target = anyio.Path(dest)
    await target.parent.mkdir(parents=True, exist_ok=True)
    await target.write_bytes(data)


async def _wait_for(client: AIStudiosClient, api: str, project_id: str, poll_s: float) -> str:
    poll = client.progress_legacy if api == "legacy" else client.progress_v3
    columns = (TextColumn("rendering"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"))
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("render", total=100)
        while True:
            state = await poll(project_id)
            bar.update(task, completed=state.progress)
            if state.done and state.download_url:
                return state.download_url
            await anyio.sleep(poll_s)


async def _submit(args: argparse.Namespace) -> int:
    cfg = _load(args)
    async with connect(cfg) as api:
        if api.simulator is not None:
            err.print(
                "no AI Studios credentials configured: "
                f"using the built-in simulator at {api.api_url}"
            )
        client = api.client
        try:
            # A manual export of its own: the service must never adopt it as one of its jobs.
            manual_id = f"cli_{uuid.uuid4().hex[:12]}"
            rendered = await _render(args, cfg, client, manual_id)
            kind, body, name = rendered.api, rendered.body, rendered.name
        except MappingError as exc:
            err.print(f"mapping error: {exc}")
            return EXIT_PROBLEMS
        if kind == TEMPLATE_MODIFY_API:
            project_id = await client.template_modify(
                body["templateId"], body["updates"], name=name
            )
        elif kind == "v3":
            project_id = await client.export_v3(body, name=name)
        else:
            project_id = await client.export_legacy(body["scenes"])
        err.print(f"submitted {name!r}: project {project_id}")
        if not args.wait:
            out.print(project_id)
            return EXIT_OK
        url = await _wait_for(client, kind, project_id, args.poll_seconds)
        out.print(url)
        if args.download:
            await _download(url, Path(args.download))
            err.print(f"saved {args.download}")
    return EXIT_OK


# --- reload ------------------------------------------------------------------------------


async def _reload(args: argparse.Namespace) -> int:
    cfg = _load(args)
    base = args.url or _admin_url(cfg)
    headers = {"Authorization": f"Bearer {cfg.http.admin_token}"} if cfg.http.admin_token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            async with session.post(f"{base}/templates/reload") as response:
                data = await response.json()
        except aiohttp.ClientConnectionError as exc:
            err.print(f"cannot reach the service at {base}: {exc}")
            return EXIT_PROBLEMS
    if response.status != 200:  # noqa: PLR2004 - anything else carries an error
        err.print(f"reload refused ({response.status}): {data.get('error')}")
        return EXIT_PROBLEMS
    outcomes: dict[str, str] = data["templates"]
    for name, outcome in outcomes.items():
        out.print(f"{name}: {outcome}")
    return EXIT_OK if all(o == "ok" for o in outcomes.values()) else EXIT_PROBLEMS


# --- jobs ----------------------------------------------------------------------------------


def _admin_url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.http.host in {"0.0.0.0", "::", ""} else cfg.http.host  # noqa: S104 - mapping a wildcard bind to loopback
    return f"http://{host}:{cfg.http.port}"


async def _jobs_request(session: aiohttp.ClientSession, args: argparse.Namespace, base: str) -> int:
    if args.action == "retry":
        async with session.post(f"{base}/jobs/{args.job_id}/retry") as response:
            data = await response.json()
            if response.status != 202:  # noqa: PLR2004 - the retry contract
                err.print(f"retry refused ({response.status}): {data.get('error')}")
                return EXIT_PROBLEMS
            if args.json:
                _print_json(data)
            else:
                out.print(f"{data['job_id']}: {data['state']}")
            return EXIT_OK
    if args.action == "show":
        url, params = f"{base}/jobs/{args.job_id}", {}
    else:
        url, params = f"{base}/jobs", {"limit": str(args.limit)}
        if args.status:
            params["state"] = args.status
    async with session.get(url, params=params) as response:
        data = await response.json()
        if response.status != 200:  # noqa: PLR2004 - anything else carries an error
            err.print(data.get("error", response.reason))
            return EXIT_PROBLEMS
    if args.json:
        _print_json(data)
    elif args.action == "show":
        out.print(*job_table(data))
    elif args.wide:
        # Unconstrained, so nothing folds: one job per line, whole ids, for grep and copying.
        wide = Console(highlight=False, markup=False, width=WIDE_CONSOLE_WIDTH)
        wide.print(jobs_table(data["jobs"], WIDE_CONSOLE_WIDTH, wide=True))
    else:
        out.print(jobs_table(data["jobs"], out.width))
    return EXIT_OK


async def _jobs(args: argparse.Namespace) -> int:
    cfg = _load(args)
    base = args.url or _admin_url(cfg)
    headers = {"Authorization": f"Bearer {cfg.http.admin_token}"} if cfg.http.admin_token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            return await _jobs_request(session, args, base)
        except aiohttp.ClientConnectionError as exc:
            err.print(f"cannot reach the service at {base}: {exc}")
            return EXIT_PROBLEMS


def _print_json(data: object) -> None:
    # Not through rich: it would read `:name:` in a value as an emoji code.
    sys.stdout.write(orjson.dumps(data).decode() + "\n")


async def _budget_request(session: aiohttp.ClientSession, base: str, *, release: bool) -> int:
    if release:
        async with session.post(f"{base}/budget/release") as response:
            data = await response.json()
            if response.status != 202:  # noqa: PLR2004 - the release contract
                err.print(f"release refused ({response.status}): {data.get('error')}")
                for problem in data.get("problems", []):
                    err.print(f"  {problem}")
                return EXIT_PROBLEMS
    async with session.get(f"{base}/budget") as response:
        data = await response.json()
        if response.status != 200:  # noqa: PLR2004 - anything else carries an error
            err.print(data.get("error", response.reason))
            return EXIT_PROBLEMS
    out.print(f"{'scope':<24} {'period':<12} {'spent':>7} {'cap':>7} {'remaining':>9}")
    for line in data["periods"]:
        cap = "-" if line["limit"] is None else str(line["limit"])
        left = "-" if line["remaining"] is None else str(line["remaining"])
        out.print(f"{line['scope']:<24} {line['period']:<12} {line['spent']:>7} {cap:>7} {left:>9}")
    out.print(f"held jobs: {data['held']}")
    return EXIT_OK


async def _budget(args: argparse.Namespace) -> int:
    cfg = _load(args)
    base = args.url or _admin_url(cfg)
    headers = {"Authorization": f"Bearer {cfg.http.admin_token}"} if cfg.http.admin_token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            return await _budget_request(session, base, release=args.action == "release")
        except aiohttp.ClientConnectionError as exc:
            err.print(f"cannot reach the service at {base}: {exc}")
            return EXIT_PROBLEMS


async def _events(args: argparse.Namespace) -> int:
    cfg = _load(args)
    headers = {"Authorization": f"Bearer {cfg.http.admin_token}"} if cfg.http.admin_token else {}
    return await cli_events.run(args, args.url or _admin_url(cfg), headers)


# --- serve / simulator ------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    configure_logging(cfg.service.log_level, cfg.service.log_format)
    from service.app import run_until_signalled  # noqa: PLC0415 - the daemon's imports are heavy

    await run_until_signalled(cfg)
    return EXIT_OK


async def _simulator(args: argparse.Namespace) -> int:
    configure_logging("info", "console")
    knobs = SimulatorKnobs(render_seconds=args.render_seconds)
    stop = anyio.Event()

    async def stop_on_signal() -> None:
        import signal  # noqa: PLC0415

        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal)
        await run_simulator(args.host, args.port, knobs, stop)
        tg.cancel_scope.cancel()
    return EXIT_OK


DESCRIPTION = "Turns business events (webhooks, MQTT messages) into AI Studios avatar videos."
EPILOG = """\
first steps:
  studiohook check         validate config.toml: sources, templates, routes
  studiohook preview --route NAME --event FILE
                           the export request an event would produce and what
                           the guard rails would do; nothing billed or written
  studiohook serve         run the daemon

README.md describes config.toml, the HTTP API and the events studiohook sends."""


def _version() -> str:
    try:
        return importlib.metadata.version("studiohook")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, as the README documents it."""
    parser = argparse.ArgumentParser(
        prog="studiohook",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"studiohook {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="config file (else $STUDIOHOOK_CONFIG, else ./config.toml)")
        return p

    command("serve", "run the daemon")
    command("check", "validate config, templates, selectors and expressions")
    for name, help_text in (
        (
            "preview",
            (
                "show the export request an event would produce and what the guard rails would do"
                " with it (reads the store, may check a cached video's URL; bills and writes"
                " nothing)"
            ),
        ),
        ("submit", "run one export from the command line"),
    ):
        p = command(name, help_text)
        p.add_argument("--route", required=True)
        p.add_argument("--event", required=True, help="a JSON event (+ optional NAME.headers.json)")
        p.add_argument("--source", help="the source the event came from (default: the route's)")
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="follow the render to the end")
            p.add_argument("--poll-seconds", type=float, default=2.0)
            p.add_argument("--download", metavar="PATH", help="save the video (with --wait)")
    reload = command("reload", "fetch saved-project templates again in a running service")
    reload.add_argument("--url", help="the service's admin URL (default: from [http] listen)")
    jobs = command("jobs", "list, show and retry jobs of a running service")
    jobs.add_argument("action", nargs="?", choices=["show", "retry"])
    jobs.add_argument("job_id", nargs="?", help="a job id, or the short id `jobs` shows")
    jobs.add_argument("--status", help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--url", help="the service's admin URL (default: from [http] listen)")
    jobs.add_argument("--wide", action="store_true", help="whole job ids, every column, no folding")
    jobs.add_argument("--json", action="store_true", help="the admin API's JSON, for scripts")
    cli_events.add_parser(command)
    budget = command("budget", "billed exports and room left; `release` applies raised caps")
    budget.add_argument("action", nargs="?", choices=["release"])
    budget.add_argument("--url", help="the service's admin URL (default: from [http] listen)")
    sim = sub.add_parser("simulator", help="run the AI Studios simulator on its own")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9900)
    sim.add_argument("--render-seconds", type=float, default=5.0)
    return parser


COMMANDS = {
    "serve": _serve,
    "check": _check,
    "preview": _preview,
    "submit": _submit,
    "jobs": _jobs,
    "events": _events,
    "reload": _reload,
    "budget": _budget,
    "simulator": _simulator,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `studiohook` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "jobs" and args.action and not args.job_id:
        err.print(f"jobs {args.action} needs a job id")
        sys.exit(EXIT_USAGE)
    if args.command != "serve":
        # Only warnings, on stderr: stdout carries the command's result (a URL, a body).
        configure_logging("warning", "console")
    try:
        options, _ = loop_options()
        tune_collector()
        code = anyio.run(COMMANDS[args.command], args, backend="asyncio", backend_options=options)
    except ConfigError as exc:
        _print_problems(exc.problems)
        err.print(f"{len(exc.problems)} problem(s) in the configuration")
        code = EXIT_PROBLEMS
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
