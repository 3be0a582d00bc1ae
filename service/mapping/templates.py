"""Template documents: the JSON a route patches into an export body.

A template is checked for shape when it is loaded, so `studiohook check` rejects a file that
is not a template before any event arrives. Both generations share the shape this needs: an
object with a non-empty `scenes` list of objects (v3 JSON template files, and the `response`
of the legacy project import).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path


class TemplateError(Exception):
    """A template that cannot be used, with the reason and where."""


def check_template_shape(document: Any, origin: str) -> dict[str, Any]:  # noqa: ANN401 - parsed JSON
    """Return the document if it looks like a template; raise TemplateError saying why not."""
    if not isinstance(document, dict):
        raise TemplateError(f"{origin}: a template must be a JSON object, not {_kind(document)}")
    scenes = document.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        raise TemplateError(f"{origin}: a template needs a non-empty `scenes` list")
    for i, scene in enumerate(scenes):
        if not isinstance(scene, dict):
            raise TemplateError(f"{origin}: scenes[{i}] must be an object, not {_kind(scene)}")
    return document


def load_template_file(path: Path) -> dict[str, Any]:
    """Read and shape-check a JSON template file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    return check_template_shape(document, str(path))


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")
