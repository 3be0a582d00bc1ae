"""Routes: which events become which video, compiled once and checked before any event.

`compile_routes` turns every selector and expression of the config into compiled form and
collects every problem with its location, so `studiohook check` shows them all at once and a
route that would fail on its first event never goes live.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from service.config import Problem, RouteConfig
from service.mapping.render import (
    Expression,
    MappingError,
    compile_condition,
    compile_expression,
    evaluate,
    evaluate_condition,
)
from service.mapping.selectors import (
    Selector,
    SelectorError,
    SelectorMatchError,
    apply_patches,
    explain_no_match,
    find,
    parse_selector,
)
from service.model import HandledEvent, RawEvent

DEFAULT_EXPORT_NAME = "{{ route }}{% if event_id %} {{ event_id }}{% endif %}"
MAX_NAME_CHARS = 100  # of the rendered part; the " #job_id" suffix is never cut

Handler = Callable[[RawEvent], HandledEvent]
T = TypeVar("T")


class HandlerLoadError(ImportError):
    """A route's `handler` that cannot be imported or is not a function.

    An ImportError, so callers that guard an import catch it; `compile_routes` does not import
    handlers (that runs user code), the config check does it once with `load_handler`.
    """


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route with its condition, patches and export name compiled and checked."""

    config: RouteConfig
    when: Expression | None
    patches: tuple[tuple[Selector, Expression], ...]
    export_name: Expression
    coalesce_key: Expression | None = None
    """Compiled with the rest, so `check` reports a bad key before the first event meets it."""

    @property
    def name(self) -> str:
        """The route's configured name."""
        return self.config.name


# --- compiling -------------------------------------------------------------------------


def compile_routes(
    routes: Sequence[RouteConfig], templates: Mapping[str, Any | None]
) -> tuple[dict[str, CompiledRoute], list[Problem]]:
    """Compile every route; return the ones without problems and every problem found.

    `templates[name]` is the loaded template document, or None when it is not available
    offline (a saved project fetched at start-up): then selectors are checked for syntax only,
    and checked again against the document once it is fetched.
    """
    compiled: dict[str, CompiledRoute] = {}
    problems: list[Problem] = []
    for index, route in enumerate(routes):
        route_problems: list[Problem] = []
        result = _compile_route(
            route, f"routes[{index}]", templates.get(route.template), route_problems
        )
        problems.extend(route_problems)
        if result is not None and not route_problems:
            compiled[route.name] = result
    return compiled, problems


def _compile_route(
    route: RouteConfig,
    where: str,
    template: Any,  # noqa: ANN401 - a JSON document
    problems: list[Problem],
) -> CompiledRoute | None:
    when = _checked(problems, f"{where}.when", compile_condition, route.when)
    export_name = _checked(
        problems,
        f"{where}.export_name",
        compile_expression,
        route.export_name or DEFAULT_EXPORT_NAME,
    )
    coalesce_key = _checked(
        problems, f"{where}.coalesce_key", compile_expression, route.coalesce_key
    )
    patches = []
    for selector_text, expression_text in route.patches:
        at = f'{where}.patches."{selector_text}"'
        selector = _checked(problems, at, parse_selector, selector_text)
        expression = _checked(problems, at, compile_expression, expression_text)
        if selector is not None and template is not None and not find(selector, template):
            problems.append(
                Problem(
                    at,
                    f"selector matches nothing in template {route.template!r}: "
                    f"{explain_no_match(selector, template)}",
                )
            )
        if selector is not None and expression is not None:
            patches.append((selector, expression))
    for i, entry in enumerate(route.events):
        reason = check_event_filter(entry)
        if reason:
            problems.append(Problem(f"{where}.events[{i}]", reason))
    if export_name is None:
        return None
    return CompiledRoute(route, when, tuple(patches), export_name, coalesce_key)


def _checked(
    problems: list[Problem], where: str, compile_: Callable[[str], T], text: str | None
) -> T | None:
    if text is None:
        return None
    try:
        return compile_(text)
    except (MappingError, SelectorError) as exc:
        kind = "selector" if isinstance(exc, SelectorError) else "expression"
        problems.append(Problem(where, f"{kind}: {exc}"))
        return None


# --- matching --------------------------------------------------------------------------


def check_event_filter(entry: str) -> str | None:
    """Say what is wrong with a route `events` entry, or None when it is usable."""
    if not entry:
        return "an empty event type matches nothing"
    if "#" not in entry and "+" not in entry:
        return None
    levels = entry.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole topic level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole topic level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter semantics: `+` one level, `#` the rest (and the parent itself).

    Topics starting with `$` (broker internals) are not matched by a filter starting with a
    wildcard, as the MQTT spec requires.
    """
    if topic.startswith("$") and topic_filter[:1] in {"+", "#"}:
        return False
    wanted = topic_filter.split("/")
    levels = topic.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or (level not in {"+", levels[i]}):
            return False
    return len(wanted) == len(levels)


def _glob_matches(pattern: str, text: str) -> bool:
    return _glob_regex(pattern).fullmatch(text) is not None


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Each configured `events` entry is turned into a regex once, not per delivery."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def route_matches(route: CompiledRoute, source: str, event_type: str) -> bool:
    """Decide whether this route wants an event of `event_type` from the source `source`.

    No `events` means every event of the source. An entry is an exact type, a `*` glob
    (`products/*`, `ContentManagement.Entry.*`), or an MQTT topic filter (`shop/+/product/#`).
    """
    if route.config.source != source:
        return False
    if not route.config.events:
        return True
    for entry in route.config.events:
        if "+" in entry or "#" in entry:
            if topic_matches(entry, event_type):
                return True
        elif _glob_matches(entry, event_type):
            return True
    return False


def should_run(route: CompiledRoute, context: Mapping[str, Any]) -> bool:
    """Apply the route's `when`; raise MappingError when it cannot be decided."""
    return route.when is None or evaluate_condition(route.when, context)


# --- building --------------------------------------------------------------------------


def build_export(route: CompiledRoute, template: Any, context: Mapping[str, Any]) -> Any:  # noqa: ANN401 - JSON documents
    """Patch a copy of the template for one event; MappingError says which patch failed."""
    values = []
    for selector, expression in route.patches:
        try:
            values.append((selector, evaluate(expression, context)))
        except MappingError as exc:
            raise MappingError(f'patch "{selector.text}": {exc}') from exc
    try:
        return apply_patches(template, values)
    except SelectorMatchError as exc:
        raise MappingError(f"patch {exc}") from exc


def build_updates(route: CompiledRoute, context: Mapping[str, Any]) -> dict[str, str]:
    """The `updates` of a server-side template: each patch key with its value as text.

    The API documents the values as what the tagged clip or the script shows, so a number
    is spelled as text and a list or an object is a mapping error, not a guess.
    """
    updates: dict[str, str] = {}
    for selector, expression in route.patches:
        try:
            value = evaluate(expression, context)
        except MappingError as exc:
            raise MappingError(f'update "{selector.text}": {exc}') from exc
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise MappingError(
                f'update "{selector.text}": the value is {type(value).__name__}, not text'
            )
        updates[selector.text] = str(value)
    return updates


def export_name(route: CompiledRoute, context: Mapping[str, Any], job_id: str) -> str:
    """The project name for one job: readable, and unique through its `#job_id` suffix.

    The suffix is what finds the project again when the create response was lost, so it is
    never truncated; the rendered part is folded to one line and cut to MAX_NAME_CHARS.
    """
    rendered = evaluate(route.export_name, {"route": route.config.name, **context})
    readable = " ".join(str(rendered).split())[:MAX_NAME_CHARS].rstrip()
    return f"{readable or route.config.name} #{job_id}"


# --- user handlers ---------------------------------------------------------------------


def load_handler(dotted: str) -> Handler:
    """Import a user handler named `pkg.module:func` or `pkg.module.func`."""
    module_name, sep, attribute = dotted.partition(":")
    if not sep:
        module_name, _, attribute = dotted.rpartition(".")
    if not module_name or not attribute:
        raise HandlerLoadError(f"{dotted!r} is not of the form pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise HandlerLoadError(f"no module named {module_name!r}") from exc
        raise HandlerLoadError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise HandlerLoadError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise HandlerLoadError(f"module {module_name!r} has no {attribute!r}")
    if not callable(function):
        raise HandlerLoadError(f"{dotted!r} is not a function")
    return cast("Handler", function)
