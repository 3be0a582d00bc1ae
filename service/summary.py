"""The one human line a console user reads at start-up: what is live, and where.

The structured start-up events (`store.opened`, `http.listening`, `service.ready`, ...) are
for machines and stay as they are; a person starting `scripts/serve` wants one sentence that
answers "where do I send events, what happens to them, does it cost money, where is my data".
Pure: it only reads the configuration, so every case is a unit test. It never prints a
credential: URLs are shown as `printable_url` has them, and no key is read.
"""

from __future__ import annotations

from service.config import Config, MqttConfig, SourceConfig
from service.log import printable_url
from service.store.factory import sqlite_path

SQLITE_PREFIX = "sqlite:///"


def _intake(source: SourceConfig, mqtt: MqttConfig | None) -> str:
    if source.kind != "mqtt":
        return f"POST /hooks/{source.name}"
    if mqtt is None:
        return f"MQTT {source.topic}, not subscribed: no [mqtt] broker configured"
    return f"MQTT {source.topic} on {mqtt.host}:{mqtt.port}"


def _state(cfg: Config) -> str:
    state_dir = cfg.service.state_dir.resolve()
    url = cfg.store.url
    if url.startswith(SQLITE_PREFIX):
        db = sqlite_path(url)
        shown = db.name if db.parent.resolve() == state_dir else str(db)
        return f"state in {state_dir} (SQLite {shown})"
    return f"state in {state_dir} (store {printable_url(url)})"


def startup_summary(cfg: Config, *, http_url: str, api_url: str, simulator: bool) -> str:
    """One line: listen address, each source with its routes, which API renders, where state is."""
    routes_of: dict[str, list[str]] = {}
    for route in cfg.routes:
        routes_of.setdefault(route.source, []).append(route.name)
    sources = "; ".join(
        f"{s.name} ({_intake(s, cfg.mqtt)}) -> {', '.join(routes_of.get(s.name, [])) or 'no route'}"
        for s in cfg.sources
    )
    if simulator:
        renders = f"renders on the built-in AI Studios simulator at {api_url} (nothing is billed)"
    else:
        renders = f"renders on AI Studios at {printable_url(api_url)} (exports are billed)"
    return (
        f"studiohook is ready: listening on {http_url}; "
        f"sources: {sources or 'none'}; {renders}; {_state(cfg)}"
    )
