"""`studiohook events`: list, show and replay inbox events through a running service's admin API.

Replay runs in the daemon, through the configuration it runs with: fix a route or a handler,
restart, then replay what failed. Parsing and printing only; the work lives in the service.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Column, Table

from service.admin_events import parse_since

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
PAGE = 500
_PIPE_WIDTH = 4000
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_seconds(text: str, now: float) -> float:
    """`--since`: `30m`, `2h`, `1d` ago, or unix seconds, or an ISO 8601 time (UTC by default)."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - float(relative.group(1)) * _UNIT_S[relative.group(2)]
    try:
        return parse_since(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: use 30m, 2h, 1d, unix seconds or an ISO 8601 time"
        ) from None


def add_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The `events` sub-command, added next to `jobs` by the main parser."""
    events = command("events", "list, show and replay received events (dead letters first)")
    events.add_argument("action", nargs="?", choices=["list", "show", "replay"], default="list")
    events.add_argument("ids", nargs="*", metavar="ID", help="event row numbers or event ids")
    events.add_argument("--status", choices=["dead_lettered", "ignored", "routed"])
    events.add_argument("--source", help="only events of this source")
    events.add_argument("--since", help="only events received since: 30m, 2h, 1d or a time")
    events.add_argument("--limit", type=int, default=50, help="how many to list (newest first)")
    events.add_argument(
        "--rerender",
        action="store_true",
        help="replay: also render again jobs whose video exists (a new, paid export each)",
    )
    events.add_argument("--yes", action="store_true", help="replay --rerender: do not ask")
    events.add_argument("--url", help="the service's admin URL (default: from [http] listen)")


async def run(args: argparse.Namespace, base: str, headers: dict[str, str]) -> int:
    """Carry out one `events` command against the admin API at `base`."""
    out = Console(highlight=False, soft_wrap=True, markup=False)
    if not out.is_terminal:
        # Piped or captured: whole lines that grep finds, not a table folded to 80 columns.
        out = Console(highlight=False, soft_wrap=True, markup=False, width=_PIPE_WIDTH)
    err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
    try:
        since = since_seconds(args.since, time.time()) if args.since else None
    except argparse.ArgumentTypeError as exc:
        err.print(str(exc))
        return EXIT_USAGE
    async with aiohttp.ClientSession(headers=headers) as session:
        api = _Admin(session, base, out, err)
        try:
            if args.action == "list":
                return await _list(api, args, since)
            if args.action == "show":
                return await _show(api, args)
            return await _replay(api, args, since)
        except aiohttp.ClientConnectionError as exc:
            err.print(f"cannot reach the service at {base}: {exc}")
            return EXIT_PROBLEMS


def _filters(args: argparse.Namespace, since: float | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if args.status:
        params["status"] = args.status
    if args.source:
        params["source"] = args.source
    if since is not None:
        params["since"] = repr(since)
    return params


@dataclass(frozen=True)
class _Admin:
    session: aiohttp.ClientSession
    base: str
    out: Console
    err: Console

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        async with self.session.get(f"{self.base}{path}", params=params) as response:
            data: dict[str, Any] = await response.json()
            if response.status != 200:  # noqa: PLR2004 - anything else carries an error
                self.err.print(data.get("error", response.reason))
                return None
            return data


async def _list(api: _Admin, args: argparse.Namespace, since: float | None) -> int:
    params = {**_filters(args, since), "limit": str(args.limit)}
    data = await api.get("/events", params)
    if data is None:
        return EXIT_PROBLEMS
    table = Table(
        Column("id", no_wrap=True, justify="right"),
        Column("received", no_wrap=True),
        Column("source", no_wrap=True),
        Column("event", no_wrap=True),
        Column("status", no_wrap=True),
        "step",
        "reason",
    )
    for event in data["events"]:
        table.add_row(
            str(event["id"]),
            _when(event["received_at"]),
            event["source"],
            event["event_id"],
            event["status"],
            event["failed_step"] or "",
            event["reason"] or "",
        )
    api.out.print(table)
    return EXIT_OK


async def _show(api: _Admin, args: argparse.Namespace) -> int:
    out = api.out
    if len(args.ids) != 1:
        api.err.print("events show needs exactly one event id")
        return EXIT_USAGE
    data = await api.get(f"/events/{args.ids[0]}", {})
    if data is None:
        return EXIT_PROBLEMS
    table = Table("field", "value", show_header=False)
    for key in ("id", "event_id", "source", "event_type", "status", "failed_step", "reason"):
        table.add_row(key, "" if data.get(key) is None else str(data[key]))
    table.add_row("received", _when(data["received_at"]))
    table.add_row("replays", str(data["replays"]))
    out.print(table)
    headers = Table("header", "value", title="headers")
    for name, value in data["headers"].items():
        headers.add_row(name, value)
    out.print(headers)
    out.print("payload:")
    if "payload" in data:
        out.print(orjson.dumps(data["payload"], option=orjson.OPT_INDENT_2).decode())
    else:
        out.print(data["payload_text"])
    return EXIT_OK


async def _targets(api: _Admin, args: argparse.Namespace, since: float | None) -> list[str] | None:
    """The events a replay names: the ids given, or every dead letter the filters select."""
    if args.ids:
        return list(args.ids)
    params = {"status": "dead_lettered", **_filters(args, since), "limit": str(PAGE)}
    refs: list[str] = []
    while True:
        data = await api.get("/events", params)
        if data is None:
            return None
        refs.extend(str(e["id"]) for e in data["events"])
        if data["next"] is None:
            return list(reversed(refs))  # oldest first, as they arrived
        params["cursor"] = str(data["next"])


def _confirmed(count: int, err: Console) -> bool:
    err.print(
        f"--rerender renders again, as a new paid export, every video of these {count} "
        "event(s) that already exists. Type 'yes' to go on: ",
        end="",
    )
    answer = sys.stdin.readline().strip().lower()
    return answer == "yes"


async def _replay(api: _Admin, args: argparse.Namespace, since: float | None) -> int:
    out, err = api.out, api.err
    if not args.ids and not args.source and since is None:
        err.print("events replay needs event ids, or --source and/or --since")
        return EXIT_USAGE
    refs = await _targets(api, args, since)
    if refs is None:
        return EXIT_PROBLEMS
    if not refs:
        out.print("nothing to replay")
        return EXIT_OK
    if args.rerender and not args.yes and not _confirmed(len(refs), err):
        err.print("nothing replayed")
        return EXIT_PROBLEMS
    body = {"rerender": bool(args.rerender)}
    code = EXIT_OK
    for ref in refs:
        async with api.session.post(f"{api.base}/events/{ref}/replay", json=body) as response:
            data = await response.json()
            if response.status != 200:  # noqa: PLR2004 - anything else carries an error
                err.print(f"{ref}: {data.get('error', response.reason)}")
                code = EXIT_PROBLEMS
                continue
        out.print(_replay_line(ref, data))
    return code


def _replay_line(ref: str, data: dict[str, Any]) -> str:
    event = data["event"]
    head = f"{ref} ({event['event_id']}): {event['status']}"
    if data["duplicate_of"] is not None:
        head += f", the same event as #{data['duplicate_of']}"
    if event["status"] == "dead_lettered":
        head += f" again at {event['failed_step']}: {event['reason']}"
    parts = []
    for job in data["jobs"]:
        if job["created"]:
            verdict = "created"
        elif job["rerendered"]:
            verdict = "re-rendering (new round)"
        else:
            verdict = f"exists ({job['state']}), nothing paid"
        parts.append(f"{job['route']} -> {job['job_id']} {verdict}")
    return head + ("".join(f"\n  {p}" for p in parts) if parts else "")


def _when(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
