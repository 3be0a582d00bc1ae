"""Templates and compiled routes, loaded once and checked together.

`studiohook check` and start-up share this, so a config that passes `check` is exactly a config
the daemon accepts. Templates of the older API (`project_id`) need the network: offline they
are syntax-checked only, at start-up they are imported and checked in full.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service.config import Config, Problem
from service.ingress.dedupe import HEADER_PREFIX, DedupeKeyError, compile_dedupe_expression
from service.mapping.routes import CompiledRoute, compile_routes, load_handler
from service.mapping.templates import TemplateError, load_template_file

ImportProject = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Catalog:
    """Everything the mapping needs: template documents by name and compiled routes by name.

    `legacy` names the templates that came from the older import API: their jobs are exported
    through that API's `{scenes}` endpoint.
    """

    templates: Mapping[str, Any]
    routes: Mapping[str, CompiledRoute]
    legacy: frozenset[str]


def _source_problems(cfg: Config) -> list[Problem]:
    problems = []
    for i, source in enumerate(cfg.sources):
        spec = source.dedupe_key
        if spec and not spec.startswith(HEADER_PREFIX):
            try:
                compile_dedupe_expression(spec)
            except DedupeKeyError as exc:
                problems.append(Problem(f"sources[{i}].dedupe_key", str(exc)))
    return problems


def _handler_problems(cfg: Config) -> list[Problem]:
    problems = []
    for i, route in enumerate(cfg.routes):
        if route.handler:
            try:
                load_handler(route.handler)
            except (ImportError, AttributeError, ValueError) as exc:
                problems.append(Problem(f"routes[{i}].handler", str(exc)))
    return problems


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
        elif template.project_id is not None:
            legacy.add(template.name)
            if import_project is not None:
                templates[template.name] = await import_project(template.project_id)
    available: dict[str, Any | None] = {t.name: templates.get(t.name) for t in cfg.templates}
    routes, route_problems = compile_routes(cfg.routes, available)
    problems.extend(route_problems)
    problems.extend(_source_problems(cfg))
    problems.extend(_handler_problems(cfg))
    return Catalog(templates=templates, routes=routes, legacy=frozenset(legacy)), problems
