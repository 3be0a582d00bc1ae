"""Templates and compiled routes, loaded once and checked together.

`studiohook check` and start-up share this, so a config that passes `check` is exactly a config
the daemon accepts. Templates of the older API (`project_id`) need the network: offline they
are syntax-checked only, at start-up they are imported and checked in full.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from handlers import Handler, HandlerError, handler_for
from service.config import Config, Problem
from service.ingress.dedupe import DedupeKeyError, compile_dedupe_expression, header_name_of
from service.mapping.routes import CompiledRoute, compile_routes, load_handler
from service.mapping.templates import TemplateError, load_template_file
from service.model import HandledEvent, RawEvent
from service.notify.mqtt import topic_template_problem

ImportProject = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Catalog:
    """Everything the mapping needs: template documents by name and compiled routes by name.

    `legacy` names the templates that came from the older import API: their jobs are exported
    through that API's `{scenes}` endpoint. `handlers` holds the routes' own handlers, imported
    once here, so intake (matching, `when`, export name) and mapping see the same context.
    """

    templates: Mapping[str, Any]
    routes: Mapping[str, CompiledRoute]
    legacy: frozenset[str]
    handlers: Mapping[str, Handler] = field(default_factory=dict)

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


async def load_catalog(
    cfg: Config, import_project: ImportProject | None = None
) -> tuple[Catalog, list[Problem]]:
    """Load every template and compile every route; return all problems found."""
    problems: list[Problem] = []
    templates: dict[str, Any] = {}
    legacy: set[str] = set()
    for i, template in enumerate(cfg.templates):
        if template.file is not None:
            try:
                templates[template.name] = load_template_file(template.file)
            except TemplateError as exc:
                problems.append(Problem(f"templates[{i}].file", str(exc)))
        elif template.kind == "legacy-project" and template.project_id is not None:
            legacy.add(template.name)
            if import_project is not None:
                templates[template.name] = await import_project(template.project_id)
    available: dict[str, Any | None] = {t.name: templates.get(t.name) for t in cfg.templates}
    routes, route_problems = compile_routes(cfg.routes, available)
    problems.extend(route_problems)
    problems.extend(_source_problems(cfg))
    problems.extend(_notify_problems(cfg))
    handlers, handler_problems = _route_handlers(cfg)
    problems.extend(handler_problems)
    catalog = Catalog(templates, routes, frozenset(legacy), handlers)
    return catalog, problems
