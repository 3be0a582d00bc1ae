"""Selectors: stable addresses for the places in a template that a route changes.

A template exported from the AI Studios editor is a deep JSON document whose list positions
shift whenever someone edits it, so a selector can pick list items by a field (`[id=...]`,
`[name=...]`, `[type=...]`, any `[field=value]`) as well as by index (`[0]`, `[-1]`) or all of
them (`[*]`). Steps are dot-separated keys, each followed by any number of brackets:

    scenes[0].clips[id=aiModel-1h4ij5h8e87].script.org
    scenes[*].clips[type=image].source_url
    scenes[0].clips[tag=parrot-image].source_url   (a clip tagged in the v3 editor)
    scenes[1].scripts[1].org                       (the second line of a conversation)
    scenes[0].AIModel.script                       (legacy imported project)

Every step must match something that exists: a typo must fail `studiohook check`, not render a
paid video with the template's placeholder text. To add a field the template does not have yet,
say so with a `+` before the last key (`scenes[0].AIModel.+scale`); only the last key may be new.

A filter value is compared with a string field as is, and with a number, boolean or null field
through its JSON spelling (`[layer=1]`, `[isDelete=false]`). Quote a value that contains `.`,
`[` or `]`: `[name="intro.v2"]`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence

Path = tuple[str | int, ...]


class SelectorError(ValueError):
    """A selector that cannot be parsed; the message shows where."""

    def __init__(self, text: str, position: int, reason: str) -> None:
        self.text = text
        self.position = position
        self.reason = reason
        super().__init__(f"{reason} at position {position + 1} in {text!r}")


class SelectorMatchError(LookupError):
    """A selector that matches nothing in the document it is applied to."""


@dataclass(frozen=True, slots=True)
class Key:
    """Step into an object's field; `create` lets the last step name a field not there yet."""

    name: str
    create: bool = False

    def __str__(self) -> str:
        return f"+{self.name}" if self.create else self.name


@dataclass(frozen=True, slots=True)
class Index:
    """Step into one list item by position (negative counts from the end)."""

    index: int

    def __str__(self) -> str:
        return f"[{self.index}]"


@dataclass(frozen=True, slots=True)
class All:
    """Step into every item of a list."""

    def __str__(self) -> str:
        return "[*]"


@dataclass(frozen=True, slots=True)
class Filter:
    """Step into the list items (objects) whose `field` equals `value`."""

    field: str
    value: str

    def __str__(self) -> str:
        return f"[{self.field}={self.value}]"


Step = Key | Index | All | Filter


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; `text` is kept for messages and config locations."""

    text: str
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return self.text


_KEY = re.compile(r"[^.\[\]=\s\"']+")
_INDEX = re.compile(r"-?\d+")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str) -> SelectorError:
        return SelectorError(self.text, self.pos, reason)

    def parse(self) -> tuple[Step, ...]:
        if not self.text:
            raise self.fail("empty selector")
        steps: list[Step] = []
        new_key_at: int | None = None
        while True:
            if new_key_at is not None:
                raise SelectorError(self.text, new_key_at, "only the last key may be new")
            start = self.pos
            key = self.key()
            new_key_at = start if key.create else None
            steps.append(key)
            while self.peek() == "[":
                steps.append(self.bracket())
            if self.pos == len(self.text):
                break
            if self.peek() != ".":
                raise self.fail(f"expected '.' or '[', found {self.peek()!r}")
            self.pos += 1
        if new_key_at is not None and not isinstance(steps[-1], Key):
            raise SelectorError(self.text, new_key_at, "only the last key may be new")
        return tuple(steps)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def key(self) -> Key:
        create = self.peek() == "+"
        if create:
            self.pos += 1
        match = _KEY.match(self.text, self.pos)
        if match is None:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected a key, found {found}")
        self.pos = match.end()
        return Key(match.group(), create=create)

    def bracket(self) -> Step:
        self.pos += 1  # the "["
        if self.peek() == "*":
            self.pos += 1
            step: Step = All()
        elif (match := _INDEX.match(self.text, self.pos)) and self._closes_at(match.end()):
            self.pos = match.end()
            step = Index(int(match.group()))
        else:
            field = _KEY.match(self.text, self.pos)
            if field is None:
                raise self.fail("expected an index, '*' or field=value")
            self.pos = field.end()
            if self.peek() != "=":
                raise self.fail("expected '=' after the field name")
            self.pos += 1
            step = Filter(field.group(), self.value())
        if self.peek() != "]":
            raise self.fail("expected ']'")
        self.pos += 1
        return step

    def _closes_at(self, position: int) -> bool:
        return self.text[position : position + 1] in {"]", ""}

    def value(self) -> str:
        quote = self.peek()
        if quote in {'"', "'"}:
            end = self.text.find(quote, self.pos + 1)
            if end < 0:
                raise self.fail("unterminated quoted value")
            value = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return value
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self.fail("expected ']'")
        value = self.text[self.pos : end]
        if not value:
            raise self.fail("empty filter value")
        self.pos = end
        return value


def parse_selector(text: str) -> Selector:
    """Parse `text`; raise SelectorError pointing at the first character that is wrong."""
    return Selector(text, _Parser(text).parse())


def _field_equals(item: Any, field: str, value: str) -> bool:  # noqa: ANN401 - JSON value
    if not isinstance(item, dict) or field not in item:
        return False
    actual = item[field]
    if isinstance(actual, str):
        return actual == value
    if isinstance(actual, bool | int | float) or actual is None:
        return json.dumps(actual) == value
    return False


def _step(step: Step, node: Any, path: Path, *, last: bool) -> list[Path]:  # noqa: ANN401 - JSON value
    if isinstance(step, Key):
        exists = isinstance(node, dict) and (step.name in node or (step.create and last))
        return [(*path, step.name)] if exists else []
    if not isinstance(node, list):
        return []
    if isinstance(step, Index):
        if -len(node) <= step.index < len(node):
            return [(*path, step.index % len(node))]
        return []
    if isinstance(step, All):
        return [(*path, i) for i in range(len(node))]
    return [
        (*path, i) for i, item in enumerate(node) if _field_equals(item, step.field, step.value)
    ]


def _get(document: Any, path: Path) -> Any:  # noqa: ANN401 - JSON value
    node = document
    for part in path:
        node = node[part]
    return node


def _walk(steps: Sequence[Step], document: Any) -> tuple[list[Path], int, list[Path]]:  # noqa: ANN401 - JSON value
    """Paths matched, the steps matched before the set went empty, and the last non-empty set."""
    paths: list[Path] = [()]
    for depth, step in enumerate(steps):
        last = depth == len(steps) - 1
        found = [p for path in paths for p in _step(step, _get(document, path), path, last=last)]
        if not found:
            return [], depth, paths
        paths = found
    return paths, len(steps), paths


def find(selector: Selector, document: Any) -> list[Path]:  # noqa: ANN401 - JSON value
    """Every concrete path the selector addresses in `document`, in document order."""
    return _walk(selector.steps, document)[0]


def explain_no_match(selector: Selector, document: Any) -> str:  # noqa: ANN401 - JSON value
    """Say which step of a selector found nothing, and what is there instead.

    A saved project's clips are addressed by the tags its author gave them in the editor, so a
    filter that finds nothing lists the values of that field that do exist (`tag there:
    parrot-image, parrot-text`), and an index past the end says how many items there are.
    """
    paths, depth, parents = _walk(selector.steps, document)
    if paths:
        return f"{selector.text} matches {len(paths)} place(s)"
    matched = _spell(selector.steps[:depth])
    step = selector.steps[depth]
    failed = str(step)
    if not matched:
        return f"the document has no {failed!r}"
    return f"{failed!r} matches nothing inside {matched!r}{_what_is_there(step, document, parents)}"


def _what_is_there(step: Step, document: Any, parents: list[Path]) -> str:  # noqa: ANN401 - JSON value
    lists = [node for node in (_get(document, p) for p in parents) if isinstance(node, list)]
    if isinstance(step, Filter):
        values: list[str] = []
        for node in lists:
            for item in node:
                if isinstance(item, dict) and step.field in item:
                    value = item[step.field]
                    text = value if isinstance(value, str) else json.dumps(value)
                    if text not in values:
                        values.append(text)
        if not values:
            return f" (no item there has a {step.field!r})"
        return f" ({step.field} there: {', '.join(values)})"
    if isinstance(step, Index) and lists:
        sizes = sorted({len(node) for node in lists})
        counts = " or ".join(str(n) for n in sizes)
        return f" (it has {counts} item{'' if sizes == [1] else 's'})"
    return ""


def _spell(steps: Sequence[Step]) -> str:
    text = ""
    for step in steps:
        text += f".{step}" if isinstance(step, Key) and text else str(step)
    return text


def _set(document: Any, path: Path, value: Any) -> None:  # noqa: ANN401 - JSON values
    parent = _get(document, path[:-1])
    parent[path[-1]] = value


def apply_patches(document: Any, patches: Sequence[tuple[Selector, Any]]) -> Any:  # noqa: ANN401 - JSON values
    """Return a patched deep copy of `document`; the template itself is never changed.

    Patches apply in order, so a later one wins where two address the same place. A selector
    that matches nothing raises SelectorMatchError: sending the template's own text instead
    would be a paid video with the wrong content.
    """
    # A JSON round trip copies a template about six times faster than copy.deepcopy, and a
    # template is JSON by construction (a file or an API answer).
    result = orjson.loads(orjson.dumps(document))
    for selector, value in patches:
        paths = find(selector, result)
        if not paths:
            raise SelectorMatchError(f"{selector.text}: {explain_no_match(selector, result)}")
        for path in paths:
            _set(result, path, copy.deepcopy(value) if isinstance(value, dict | list) else value)
    return result
