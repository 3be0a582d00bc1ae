"""SIGHUP re-reads the spending caps in the real daemon: a bad file is refused, a raised cap
releases the held jobs oldest first, a route's own cap is re-read too, and nothing needs a
restart."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.support.daemon_fixtures import (
    SHOP_ROUTE,
    SHOP_SOURCE,
    Daemon,
    daemon_config,
    job_states,
    post_delivery,
    shop_job_id,
    wait_until,
)

pytestmark = pytest.mark.integration


UPDATE_ROUTE = "product-update"


def with_update_route(text: str) -> str:
    """A second route on the shop source, for `products/update` deliveries."""
    return f"""{text}
[[routes]]
name = "{UPDATE_ROUTE}"
source = "{SHOP_SOURCE}"
events = ["products/update"]
template = "promo"
"""


def with_caps(
    text: str, *, per_day: str | None = None, routes: Mapping[str, int] | None = None
) -> str:
    """The config with a global daily cap (none unless given) and per-route daily caps."""
    for route, cap in (routes or {}).items():
        name_line = f'name = "{route}"\n'
        assert text.count(name_line) == 1
        text = text.replace(name_line, f"{name_line}max_exports_per_day = {cap}\n")
    day = "" if per_day is None else f"exports_per_day = {per_day}\n"
    return f"{text}\n[budget]\n{day}"


def test_sighup_applies_raised_caps_per_route_and_refuses_a_broken_file(
    tmp_path: Path, daemon_factory: Callable[[str], Daemon]
) -> None:
    base = with_update_route(daemon_config(tmp_path, render_seconds=0.2))
    daemon = daemon_factory(with_caps(base, per_day="1"))
    url = daemon.start()
    assert url is not None
    run = daemon.current
    ids = [f"hup-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
    for webhook_id in ids:
        assert post_delivery(url, webhook_id, f"Lamp {webhook_id}") == 202
    jobs = [shop_job_id(webhook_id) for webhook_id in ids]

    def states() -> list[str]:
        current = job_states(daemon.db_path)
        return [current.get(job, "") for job in jobs]

    wait_until(
        lambda: sorted(states()) == ["held", "held", "notified"],
        what="one job billed, two held",
        explain=run.tail,
    )
    held = [job for job, state in zip(jobs, states(), strict=True) if state == "held"]

    # A file with a problem changes nothing, and the log says why and what is kept.
    daemon.config_path.write_text(with_caps(base, per_day="-3"))
    run.send(signal.SIGHUP)
    refused = run.wait_for(
        lambda r: r.get("event") == "budget.reload_refused", what="budget.reload_refused"
    )
    assert refused is not None
    assert "budget.exports_per_day" in refused["problems"]
    assert refused["kept"].startswith("day=1 ")
    assert sorted(states()) == ["held", "held", "notified"]

    # Room for one more: the older held job goes, the newer one still waits.
    daemon.config_path.write_text(with_caps(base, per_day="2"))
    run.send(signal.SIGHUP)
    reloaded = run.wait_for(lambda r: r.get("event") == "budget.reloaded", what="budget.reloaded")
    assert reloaded is not None
    assert reloaded["caps"].startswith("day=2 ")
    released = run.wait_for(lambda r: r.get("event") == "budget.released", what="budget.released")
    assert released is not None
    assert (released["count"], released["still_held"]) == (1, 1)
    wait_until(
        lambda: job_states(daemon.db_path)[held[0]] == "notified",
        what="the older held job notified",
        explain=run.tail,
    )
    assert job_states(daemon.db_path)[held[1]] == "held"

    # Route caps are re-read too: the global cap goes, but new-product has spent its 2 today,
    # so its held job stays; product-update may spend nothing, so its first job is held.
    daemon.config_path.write_text(with_caps(base, routes={SHOP_ROUTE: 2, UPDATE_ROUTE: 0}))
    run.send(signal.SIGHUP)
    route_caps = f"day=none month=none route:{SHOP_ROUTE}=2 route:{UPDATE_ROUTE}=0"
    assert run.wait_for(lambda r: r.get("caps") == route_caps, what="the route caps reloaded")
    update_id = f"hup-update-{uuid.uuid4().hex[:8]}"
    assert post_delivery(url, update_id, f"Lamp {update_id}", topic="products/update") == 202
    update_job = shop_job_id(update_id, UPDATE_ROUTE)
    wait_until(
        lambda: job_states(daemon.db_path).get(update_job) == "held",
        what="the product-update job held by its route cap",
        explain=run.tail,
    )

    # Raising one route's cap releases that route's job only; the lowered route's stays held.
    daemon.config_path.write_text(with_caps(base, routes={SHOP_ROUTE: 1, UPDATE_ROUTE: 1}))
    run.send(signal.SIGHUP)
    by_route = run.wait_for(
        lambda r: r.get("event") == "budget.released" and r is not released,
        what="budget.released after the route caps changed",
    )
    assert by_route is not None
    assert (by_route["count"], by_route["still_held"]) == (1, 1)
    wait_until(
        lambda: job_states(daemon.db_path)[update_job] == "notified",
        what="the product-update job notified",
        explain=run.tail,
    )
    assert job_states(daemon.db_path)[held[1]] == "held"
    assert len(run.events("budget.released")) == 2
    assert run.process.poll() is None
