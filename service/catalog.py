"""Templates and compiled routes, loaded once and checked together.

`studiohook check` and start-up share this, so a config that passes `check` is exactly a config
the daemon accepts. Saved projects (`project_id`, either API) and the layout project of a
server-side template need the network: offline they are syntax-checked only, at start-up (and
in `check` with credentials) they are read and checked in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from handlers import Handler, HandlerError, handler_for
from service.aistudios.errors import AIStudiosError
from service.config import Config, Problem, TemplateConfig
from service.ingress.dedupe import DedupeKeyError, compile_dedupe_expression, header_name_of
from service.mapping.routes import CompiledRoute, compile_routes, load_handler
from service.mapping.templates import TemplateError, check_template_shape, load_template_file
from service.mapping.updates import (
    UpdateKeyError,
    duplicate_keys,
    layout_of,
    layout_problem,
    parse_update_key,
)
from service.model import HandledEvent, RawEvent
from service.notify.mqtt import topic_template_problem


class SavedProjectReader(Protocol):
    """The free reads that turn a saved project into a template (the API client has them)."""

    async def import_project_legacy(self, project_id: str) -> dict[str, Any]:
        """A project saved on the older aistudios.com."""
        ...

    async def fetch_saved_project_v3(self, project_id: str) -> dict[str, Any]:
        """A project saved in today's v3 editor."""
        ...


@dataclass(frozen=True, slots=True)
class Catalog:
    """Everything the mapping needs: template documents by name and compiled routes by name.

    `legacy` names the templates that came from the older import API: their jobs are exported
    through that API's `{scenes}` endpoint. `server_templates` maps the names of server-side
    templates to their `templateId`: their routes' patches are `updates` keys. `handlers` holds
    the routes' own handlers, imported once here, so intake (matching, `when`, export name) and
    mapping see the same context.
    """

    templates: Mapping[str, Any]
    routes: Mapping[str, CompiledRoute]
    legacy: frozenset[str]
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    server_templates: Mapping[str, str] = field(default_factory=dict)
    one_step: frozenset[str] = frozenset()
    """Templates whose `export_flow` is `one-step`: created and exported in one billed call."""

    def replace_template(self, name: str, document: Any) -> None:  # noqa: ANN401 - a JSON document
        """Swap in a re-fetched saved project: jobs mapped from now on use it."""
        if not isinstance(self.templates, dict):
            raise TypeError("this catalog's templates cannot be replaced")
        self.templates[name] = document

    def handled(
        self, route: CompiledRoute, source_kind: str, raw: RawEvent, default: HandledEvent | None
    ) -> HandledEvent:
        """What `route` sees of an event: its own handler's view, else the source kind's."""
        custom = self.handlers.get(route.config.name)
        if custom is not None:
            try:
                return custom(raw)
            except HandlerError:
                raise
            except Exception as exc:  # user code: any failure is that event's, not ours
                raise HandlerError(f"handler {route.config.handler} failed: {exc!r}") from exc
        return default if default is not None else handler_for(source_kind)(raw)


def _source_problems(cfg: Config) -> list[Problem]:
    problems = []
    for i, source in enumerate(cfg.sources):
        spec = source.dedupe_key
        if not spec or header_name_of(spec) is not None:
            continue
        try:
            compile_dedupe_expression(spec)
        except DedupeKeyError as exc:
            problems.append(Problem(f"sources[{i}].dedupe_key", str(exc)))
    return problems


def _notify_problems(cfg: Config) -> list[Problem]:
    problems = []
    for i, target in enumerate(cfg.notify):
        if target.kind == "mqtt":
            problem = topic_template_problem(target.topic)
            if problem is not None:
                problems.append(Problem(f"notify[{i}].topic", problem))
    return problems


def _route_handlers(cfg: Config) -> tuple[dict[str, Handler], list[Problem]]:
    handlers: dict[str, Handler] = {}
    problems = []
    for i, route in enumerate(cfg.routes):
        if route.handler:
            try:
                handlers[route.name] = load_handler(route.handler)
            except (ImportError, AttributeError, ValueError) as exc:
                problems.append(Problem(f"routes[{i}].handler", str(exc)))
    return handlers, problems


async def fetch_saved_project(
    reader: SavedProjectReader, template: TemplateConfig
) -> dict[str, Any]:
    """Read a saved project through its API and check it is a template; TemplateError if not."""
    project_id = template.project_id or ""
    if template.kind == "legacy-project":
        document = await reader.import_project_legacy(project_id)
    else:
        document = await reader.fetch_saved_project_v3(project_id)
    return check_template_shape(document, f"saved project {project_id!r}")


def routes_problems_for(cfg: Config, name: str, document: Any) -> list[Problem]:  # noqa: ANN401 - a JSON document
    """Every route on template `name` checked against `document` (a re-fetched saved project)."""
    available = {t.name: document if t.name == name else None for t in cfg.templates}
    _, problems = compile_routes(cfg.routes, available)
    on_template = {f"routes[{i}]" for i, r in enumerate(cfg.routes) if r.template == name}
    return [p for p in problems if p.location.split(".", 1)[0] in on_template]


def _updates_problems(cfg: Config, layouts: Mapping[str, Any]) -> list[Problem]:
    """Routes on server-side templates: each patch key must be an `updates` key it takes."""
    kinds = {t.name: t.kind for t in cfg.templates}
    problems = []
    for i, route in enumerate(cfg.routes):
        if kinds.get(route.template) != "server-template":
            continue
        keys = []
        layout = layouts.get(route.template)
        for key_text, _ in route.patches:
            at = f'routes[{i}].patches."{key_text}"'
            try:
                key = parse_update_key(key_text)
            except UpdateKeyError as exc:
                problems.append(Problem(at, str(exc)))
                continue
            keys.append(key)
            problem = layout_problem(key, layout_of(layout)) if layout is not None else None
            if problem is not None:
                problems.append(Problem(at, f"template {route.template!r}: {problem}"))
        for first, second in duplicate_keys(keys):
            problems.append(
                Problem(
                    f'routes[{i}].patches."{second.text}"',
                    f"addresses the same place as {first.text!r}",
                )
            )
    return problems


@dataclass
class _Loaded:
    templates: dict[str, Any] = field(default_factory=dict)
    layouts: dict[str, Any] = field(default_factory=dict)
    legacy: set[str] = field(default_factory=set)
    server: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


async def _read_templates(cfg: Config, reader: SavedProjectReader | None) -> _Loaded:
    loaded = _Loaded()
    for i, template in enumerate(cfg.templates):
        if template.file is not None:
            try:
                loaded.templates[template.name] = load_template_file(template.file)
            except TemplateError as exc:
                loaded.problems.append(Problem(f"templates[{i}].file", str(exc)))
            continue
        if template.template_id is not None:
            loaded.server[template.name] = template.template_id
        if template.kind == "legacy-project":
            loaded.legacy.add(template.name)
        if reader is not None:
            await _fetch_into(loaded, reader, template, f"templates[{i}]")
    return loaded


async def _fetch_into(
    loaded: _Loaded, reader: SavedProjectReader, template: TemplateConfig, where: str
) -> None:
    """Fetch a saved project (or a server template's layout project); a failure is a problem."""
    try:
        if template.template_id is not None and template.layout_project_id is not None:
            layout = await reader.fetch_saved_project_v3(template.layout_project_id)
            loaded.layouts[template.name] = layout
        elif template.project_id is not None:
            loaded.templates[template.name] = await fetch_saved_project(reader, template)
    except (AIStudiosError, TemplateError) as exc:
        key = "layout_project_id" if template.template_id is not None else "project_id"
        reason = exc.message if isinstance(exc, AIStudiosError) else str(exc)
        loaded.problems.append(Problem(f"{where}.{key}", f"could not be read: {reason}"))


async def load_catalog(
    cfg: Config, reader: SavedProjectReader | None = None
) -> tuple[Catalog, list[Problem]]:
    """Load every template and compile every route; return all problems found.

    Without a `reader` (offline: `check` with no credentials, `preview`) saved projects are
    not fetched and their routes are checked for syntax only.
    """
    loaded = await _read_templates(cfg, reader)
    problems = loaded.problems
    available: dict[str, Any | None] = {t.name: loaded.templates.get(t.name) for t in cfg.templates}
    routes, route_problems = compile_routes(cfg.routes, available)
    problems.extend(route_problems)
    problems.extend(_updates_problems(cfg, loaded.layouts))
    problems.extend(_source_problems(cfg))
    problems.extend(_notify_problems(cfg))
    handlers, handler_problems = _route_handlers(cfg)
    problems.extend(handler_problems)
    one_step = frozenset(t.name for t in cfg.templates if t.export_flow == "one-step")
    catalog = Catalog(
        loaded.templates, routes, frozenset(loaded.legacy), handlers, loaded.server, one_step
    )
    return catalog, problems
