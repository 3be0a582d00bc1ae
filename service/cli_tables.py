"""How `studiohook jobs` lays jobs out in a terminal: pure, so every width is a unit test.

A full job id is 28 characters; at 80 columns it used to squeeze every other column into
`new-p…`. The list shows a short id instead (like git's abbreviated hashes: the first hex
digits, as many as keep it unique among the listed jobs), which `jobs show`/`jobs retry` and
the admin API accept. Columns that can fold do, and the least useful ones are dropped when even
folding cannot fit them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.table import Column, Table
from rich.text import Text

JOB_ID_PREFIX = "job_"
SHORT_ID_MIN_CHARS = 8
"""32 bits: among a million jobs a given short id is shared with about one chance in 4,000."""

COLUMN_GAP = 2
"""Characters rich puts between two columns of a table without vertical lines."""

FOLD_MIN_WIDTH = {"route": 12, "error": 20, "project": 12}
"""The narrowest a folding column may get before it is better dropped."""

DROP_ORDER = ("project", "route")
"""Dropped first to last when the terminal is too narrow; job, state, progress and error stay."""

COLUMNS = ("job", "route", "state", "progress", "error", "project")


def short_job_ids(job_ids: Sequence[str], min_chars: int = SHORT_ID_MIN_CHARS) -> dict[str, str]:
    """Each id's shortest prefix of hex digits (`job_` left off) that no other listed id shares."""
    digits = sorted({job_id.removeprefix(JOB_ID_PREFIX) for job_id in job_ids})
    needed: dict[str, int] = {}
    for before, after in itertools.pairwise(digits):
        common = next(
            (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
            min(len(before), len(after)),
        )
        needed[before] = max(needed.get(before, 0), common + 1)
        needed[after] = max(needed.get(after, 0), common + 1)
    short = {}
    for job_id in job_ids:
        hex_part = job_id.removeprefix(JOB_ID_PREFIX)
        short[job_id] = hex_part[: max(min_chars, needed.get(hex_part, 0))]
    return short


def columns_that_fit(natural: Mapping[str, int], width: int) -> list[str]:
    """The columns to show: folding ones shrink to FOLD_MIN_WIDTH, then DROP_ORDER goes first."""
    shown = [c for c in COLUMNS if c in natural]

    def needed(columns: list[str]) -> int:
        widths = [min(natural[c], FOLD_MIN_WIDTH.get(c, natural[c])) for c in columns]
        return sum(widths) + COLUMN_GAP * (len(columns) - 1)

    for column in DROP_ORDER:
        if needed(shown) <= width:
            break
        if column in shown:
            shown.remove(column)
    return shown


def _cells(job: Mapping[str, Any], short_id: str) -> dict[str, str]:
    return {
        "job": short_id,
        "route": str(job["route"]),
        "state": str(job["state"]),
        "progress": f"{job['progress']:.0f}%",
        "error": str(job.get("error_message") or ""),
        "project": str(job.get("project_id") or ""),
    }


def jobs_table(jobs: Sequence[Mapping[str, Any]], width: int, *, wide: bool = False) -> Table:
    """The job list for a terminal `width` columns wide; `wide` keeps full ids and every column.

    A wide table is meant to be printed unconstrained (it never folds), for `grep` and for
    copying whole ids.
    """
    ids = [str(job["job_id"]) for job in jobs]
    short = {job_id: job_id for job_id in ids} if wide else short_job_ids(ids)
    rows = [_cells(job, short[job_id]) for job, job_id in zip(jobs, ids, strict=True)]
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in COLUMNS}
    shown = list(COLUMNS) if wide else columns_that_fit(natural, width)
    columns = []
    for name in shown:
        folds = name in FOLD_MIN_WIDTH and not wide
        columns.append(
            Column(
                name,
                justify="right" if name == "progress" else "left",
                no_wrap=not folds,
                overflow="fold",
                min_width=None if folds else natural[name],
            )
        )
    table = Table(
        *columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for row in rows:
        table.add_row(*(Text(row[name]) for name in shown))  # text, never markup
    return table


def job_table(job: Mapping[str, Any]) -> tuple[Table, Table]:
    """One job's fields, then its history; long values fold instead of being cut."""
    fields = Table(
        Column("field", no_wrap=True), Column("value", overflow="fold"), show_header=False
    )
    for key, value in job.items():
        if key != "history":
            fields.add_row(key, "" if value is None else str(value))
    history = Table(
        Column("from", no_wrap=True),
        Column("to", no_wrap=True),
        Column("at", no_wrap=True),
        Column("note", overflow="fold"),
        title="history",
    )
    for step in job["history"]:
        history.add_row(step["from"] or "", step["to"], str(step["at"]), step["note"] or "")
    return fields, history
