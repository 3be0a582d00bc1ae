"""`updates` keys of `POST /api/odin/v3/template/modify`: pure parsing, checking and applying.

The server-side template API addresses clips by their editor tag, not by a path: a key is
`title`, `subtitles` or `scripts`, optionally with a suffix `_N`. For `title` and `subtitles`
the suffix picks the (N+1)-th clip with that tag in video order (`title` is the first,
`title_2` the third); `scripts_N` is the script of scene N+1. A route on a server-side template
writes these keys where other routes write selectors, so they are checked when the config
loads, and again against the template's clips when its layout is known.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

UPDATE_KINDS = ("title", "subtitles", "scripts")
_KEY = re.compile(r"(?P<kind>[A-Za-z]+)(?:_(?P<n>\d+))?")


class UpdateKeyError(ValueError):
    """An `updates` key the documented API does not have, or one the template cannot satisfy."""


@dataclass(frozen=True, slots=True)
class UpdateKey:
    """A parsed key: which tag (or `scripts`) and the 0-based position it addresses."""

    text: str
    kind: str
    index: int


def parse_update_key(text: str) -> UpdateKey:
    """Parse `title`, `subtitles_1`, `scripts_3`; raise UpdateKeyError saying what is allowed."""
    match = _KEY.fullmatch(text)
    if match is None or match.group("kind") not in UPDATE_KINDS:
        raise UpdateKeyError(
            f"{text!r} is not an updates key: use title, subtitles or scripts, "
            "optionally with a suffix _N (title_2 is the third clip tagged title)"
        )
    return UpdateKey(text, match.group("kind"), int(match.group("n") or 0))


def duplicate_keys(keys: list[UpdateKey]) -> list[tuple[UpdateKey, UpdateKey]]:
    """Pairs of keys that address the same place (`title` and `title_0`)."""
    seen: dict[tuple[str, int], UpdateKey] = {}
    pairs = []
    for key in keys:
        other = seen.setdefault((key.kind, key.index), key)
        if other is not key:
            pairs.append((other, key))
    return pairs


@dataclass(frozen=True, slots=True)
class Layout:
    """What a template offers to `updates`: tagged clips per tag, in video order, and scenes."""

    tags: dict[str, int]
    scenes: int


def layout_of(document: Any) -> Layout:  # noqa: ANN401 - a project document
    """Count the tagged clips and the scenes of a v3 project (or template) document."""
    tags: dict[str, int] = {}
    scenes = document.get("scenes") if isinstance(document, dict) else None
    scenes = scenes if isinstance(scenes, list) else []
    for scene in scenes:
        clips = scene.get("clips") if isinstance(scene, dict) else None
        for clip in clips if isinstance(clips, list) else []:
            tag = clip.get("tag") if isinstance(clip, dict) else None
            if isinstance(tag, str) and tag:
                tags[tag] = tags.get(tag, 0) + 1
    return Layout(tags, len(scenes))


def layout_problem(key: UpdateKey, layout: Layout) -> str | None:
    """Why the template cannot take `key`, naming what it does have; None when it can."""
    if key.kind == "scripts":
        if key.index < layout.scenes:
            return None
        return f"{key.text!r} addresses scene {key.index + 1}, but the template has {layout.scenes}"
    present = layout.tags.get(key.kind, 0)
    if key.index < present:
        return None
    others = ", ".join(f"{tag} ({n})" for tag, n in sorted(layout.tags.items())) or "none"
    if present == 0:
        return f"{key.text!r}: no clip is tagged {key.kind!r}; tags there: {others}"
    return (
        f"{key.text!r} addresses clip {key.index + 1} tagged {key.kind!r}, "
        f"but the template has {present}; tags there: {others}"
    )


def apply_updates(document: dict[str, Any], updates: dict[str, str]) -> dict[str, Any]:
    """Change a copy of a template as the API does: tagged clips' `text`, scenes' script `org`.

    Raises UpdateKeyError for a key the document cannot take (the API would refuse it too).
    """
    result = copy.deepcopy(document)
    layout = layout_of(result)
    for text, value in updates.items():
        key = parse_update_key(text)
        problem = layout_problem(key, layout)
        if problem is not None:
            raise UpdateKeyError(problem)
        scenes = result["scenes"]
        if key.kind == "scripts":
            scripts = scenes[key.index].setdefault("scripts", [])
            if not scripts:
                scripts.append({"org": value})
            else:
                scripts[0]["org"] = value
            continue
        tagged = [
            clip
            for scene in scenes
            for clip in scene.get("clips", [])
            if isinstance(clip, dict) and clip.get("tag") == key.kind
        ]
        tagged[key.index]["text"] = value
    return result
