"""config.toml -> frozen dataclasses.

Every problem is collected with its key path (`routes[0].template`) so `studiohook check` can
print all of them at once instead of stopping at the first. Unknown keys are errors: a typo in
a config that drives paid exports must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

DEFAULT_V3_BASE_URL = "https://app.aistudios.com"
DEFAULT_LEGACY_BASE_URL = "https://aistudios.com"

SOURCE_KINDS = frozenset(
    {"shopify", "woocommerce", "strapi", "contentful", "standard", "hmac", "token", "json", "mqtt"}
)
NOTIFY_KINDS = frozenset({"mqtt", "webhook", "file"})
DEFAULT_NOTIFY_EVENTS = ("video.ready", "video.failed", "video.superseded", "budget.exhausted")
NOTIFY_EVENTS = frozenset(DEFAULT_NOTIFY_EVENTS)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, with where it is."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found, so the user fixes them in one pass."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Process-wide settings."""

    state_dir: Path
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"
    shutdown_grace_s: float = 30.0
    instance: str = ""
    """This process's owner id for job claims; empty means the host name. Instances sharing a
    PostgreSQL store must each have their own (a restart keeps it, to take its jobs back)."""
    lease_s: float = 15.0
    """How long a claim on a job lasts unless renewed (every third of it): the time after which
    another instance takes over the jobs of one that died."""

    @property
    def instance_id(self) -> str:
        """The owner id in use: `instance`, else the host name (claims, metrics, client ids)."""
        return self.instance or socket.gethostname()


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener: webhooks in, callbacks, admin."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 10.0
    admin_token: str | None = field(default=None, repr=False)
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Knobs for the built-in AI Studios simulator used when no credentials are set."""

    render_seconds: float = 5.0
    port: int = 0


@dataclass(frozen=True, slots=True)
class AIStudiosConfig:
    """How to reach AI Studios and how hard to push it."""

    base_url: str = DEFAULT_V3_BASE_URL
    legacy_base_url: str = DEFAULT_LEGACY_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    app_id: str | None = field(default=None, repr=False)
    user_key: str | None = field(default=None, repr=False)
    max_concurrent_exports: int = 4
    max_requests_per_second: float | None = None
    """A hard cap on the request rate; unset, the pace follows the API's 429s alone."""
    request_rate_ceiling: float = 2000.0
    """Where the adaptive pace starts and climbs back to after a 429 (requests/s)."""
    render_deadline_seconds: float = 1800.0
    stall_seconds: float = 600.0
    request_timeout_s: float = 30.0
    reconcile_wait_s: float = 1800.0
    """The documented project list may show only finished exports: an export whose response
    was lost may not appear until its render is done, so the default is the render deadline
    (whatever it is configured to) before concluding that a create never happened."""
    poll_min_interval_s: float = 0.5
    poll_max_interval_s: float = 150.0
    first_poll_s: float = 1.0
    """The first poll of a template no render has finished for yet; afterwards its learned
    render time decides (see `Tracker.track`)."""
    export_settle_s: float = 5.0
    """How long a project whose export outcome is unknown may still read as a plain draft
    before it is exported again (the two-step flow; the read is `GET …/editor/project/{id}`)."""
    max_retries: int = 8
    download_hosts: tuple[str, ...] = ()
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)

    @property
    def uses_simulator(self) -> bool:
        """No credentials: talk to the built-in simulator instead of the paid service."""
        return not self.api_key and not (self.app_id and self.user_key)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where durable state lives."""

    url: str


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The broker studiohook subscribes to (ingress) and publishes to (notify)."""

    url: str
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = "studiohook"
    session_expiry_seconds: int = 86400
    receive_maximum: int = 1000
    """MQTT 5 Receive Maximum: how many QoS 1 messages the broker hands over before we ack.
    Each commit group is drawn from them, so a small window caps messages per fsync."""
    reader_check_s: float = 1.0
    """Instances sharing a PostgreSQL store elect one MQTT reader: it proves it still holds the
    election lock this often, and an instance standing by tries to take the lock this often."""


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One place events come from, and how its deliveries are verified and deduplicated."""

    name: str
    kind: str
    secrets: tuple[str, ...] = field(default=(), repr=False)
    topic: str | None = None
    dedupe_key: str | None = None
    signature_header: str | None = None
    signature_encoding: Literal["hex", "base64"] = "hex"
    signature_prefix: str = ""
    token_header: str = "Authorization"  # noqa: S105 - a header name, not a secret


TEMPLATE_APIS = frozenset({"v3", "legacy"})
EXPORT_FLOWS = frozenset({"two-step", "one-step"})


@dataclass(frozen=True, slots=True)
class TemplateConfig:
    """A video template, from one of four sources (the README's table says which is which).

    - `file`: a v3 JSON template on disk, exported with `POST /api/odin/v3/editor/project`;
    - `project_id` + `api = "v3"`: a project saved in today's editor, fetched with
      `GET /api/odin/v3/editor/project/{id}`, patched, exported like a file template;
    - `project_id` + `api = "legacy"`: a project saved on the older aistudios.com, imported,
      patched and exported through that API's `{scenes}` endpoint;
    - `template_id`: a server-side template; a route's patches become the `updates` of
      `POST /api/odin/v3/template/modify`. `layout_project_id`, when set, names a saved v3
      project that shows the template's clips, so `check` can verify tags and `_N` suffixes.

    A saved project is fetched at start-up, again on reload (SIGHUP, `studiohook reload`),
    and, when `refresh_seconds` is set, whenever it is older than that.
    """

    name: str
    file: Path | None = None
    project_id: str | None = None
    api: Literal["v3", "legacy"] | None = None
    template_id: str | None = None
    layout_project_id: str | None = None
    refresh_seconds: float | None = None
    export_flow: str = "two-step"
    """v3 only: `two-step` creates an unbilled draft, commits its id, then exports it (an
    uncertain export is settled by reading that project); `one-step` creates and exports in
    one call (an uncertain one is settled by finding its name in the project list)."""

    @property
    def kind(self) -> Literal["file", "v3-project", "legacy-project", "server-template"]:
        """Which of the four template sources this is."""
        if self.template_id is not None:
            return "server-template"
        if self.project_id is not None:
            return "legacy-project" if self.api == "legacy" else "v3-project"
        return "file"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Which events become which video, and how the template is patched for each."""

    name: str
    source: str
    template: str
    events: tuple[str, ...] = ()
    when: str | None = None
    handler: str | None = None
    patches: tuple[tuple[str, str], ...] = ()
    export_name: str | None = None
    download: bool = False
    max_exports_per_day: int | None = None
    """This route's own daily cap on billed exports (UTC days), under the global ones."""
    cache_seconds: float | None = None
    """Reuse a video whose export body was identical within this many seconds (off: None)."""
    coalesce_key: str | None = None
    """Jinja2: events with the same key within `coalesce_seconds` become one job (the latest)."""
    coalesce_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Global spending caps on billed exports, per UTC day and month; unset means no cap."""

    exports_per_day: int | None = None
    exports_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """A place "video ready" / "video failed" is announced."""

    name: str
    kind: str
    events: tuple[str, ...] = DEFAULT_NOTIFY_EVENTS
    topic: str = "studiohook/videos/{route}/{job_id}"
    url: str | None = None
    secret: str | None = field(default=None, repr=False)
    path: Path | None = None
    download: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, validated."""

    path: Path
    service: ServiceConfig
    http: HttpConfig
    aistudios: AIStudiosConfig
    store: StoreConfig
    mqtt: MqttConfig | None
    sources: tuple[SourceConfig, ...]
    templates: tuple[TemplateConfig, ...]
    routes: tuple[RouteConfig, ...]
    notify: tuple[NotifyConfig, ...]
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def source(self, name: str) -> SourceConfig | None:
        """Look a source up by name."""
        return next((s for s in self.sources if s.name == name), None)


# --- environment expansion -------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, env: dict[str, str], location: str, problems: list[Problem]) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; an unset variable without default is a problem."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(Problem(location, f"environment variable {name} is not set"))
        return ""

    return _VAR.sub(replace, value)


def _expand_tree(node: Any, env: dict[str, str], path: str, problems: list[Problem]) -> Any:  # noqa: ANN401 - TOML values are any of its types
    if isinstance(node, str):
        return expand_env(node, env, path, problems)
    if isinstance(node, dict):
        return {k: _expand_tree(v, env, _join(path, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's own defaults, so the loader never writes a default a second time."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


# --- typed table reader ----------------------------------------------------------------

T = TypeVar("T")


class _Table:
    """Reads typed keys from one TOML table, recording problems and unknown keys."""

    def __init__(self, data: Any, path: str, problems: list[Problem]) -> None:  # noqa: ANN401 - raw TOML
        self.path = path
        self.problems = problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(Problem(path, f"must be a table, not {type(data).__name__}"))
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def _get(self, key: str, kinds: tuple[type, ...], kind_name: str) -> Any:  # noqa: ANN401
        self.used.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            self.problems.append(Problem(_join(self.path, key), f"must be {kind_name}"))
            return None
        if not isinstance(value, kinds):
            self.problems.append(
                Problem(_join(self.path, key), f"must be {kind_name}, not {type(value).__name__}")
            )
            return None
        return value

    def text(self, key: str, default: T, *, choices: frozenset[str] | None = None) -> str | T:
        value = self._get(key, (str,), "a string")
        if value is None:
            return default
        if choices is not None and value not in choices:
            allowed = ", ".join(sorted(choices))
            self.problems.append(Problem(_join(self.path, key), f"must be one of {allowed}"))
            return default
        return value  # type: ignore[no-any-return]

    def required_text(self, key: str) -> str:
        value = self.text(key, None)
        if value is None and key not in self.data:
            self.problems.append(Problem(_join(self.path, key), "is required"))
        return value or ""

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if value < minimum:
            self.problems.append(Problem(_join(self.path, key), f"must be at least {minimum:g}"))
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self._get(key, (int,), "an integer")
        if value is None:
            return default
        if value < minimum:
            self.problems.append(Problem(_join(self.path, key), f"must be at least {minimum}"))
            return default
        return int(value)

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is None else bool(value)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self._get(key, (list, str), "a list of strings")
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problems.append(Problem(f"{_join(self.path, key)}[{i}]", "must be a string"))
            else:
                items.append(item)
        return tuple(items)

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.data.get(key), _join(self.path, key), self.problems)

    def array_of_tables(self, key: str) -> list[_Table]:
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.problems.append(Problem(_join(self.path, key), "must be an array of tables"))
            return []
        return [
            _Table(v, f"{_join(self.path, key)}[{i}]", self.problems) for i, v in enumerate(value)
        ]

    def finish(self) -> None:
        """Report every key nobody asked for: a typo must not pass silently."""
        for key in sorted(set(self.data) - self.used):
            self.problems.append(Problem(_join(self.path, key), "unknown key"))


# --- sections ----------------------------------------------------------------------------


def _service(t: _Table, base_dir: Path) -> ServiceConfig:
    d = _defaults(ServiceConfig)
    state_dir = Path(t.text("state_dir", "./state"))
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    cfg = ServiceConfig(
        state_dir=state_dir,
        log_format=t.text("log_format", "console", choices=frozenset({"console", "json"})),  # type: ignore[arg-type]
        log_level=t.text(
            "log_level", "info", choices=frozenset({"debug", "info", "warning", "error"})
        ),
        shutdown_grace_s=t.number("shutdown_grace_seconds", d["shutdown_grace_s"]),
        instance=t.text("instance", ""),
        lease_s=t.number("lease_seconds", d["lease_s"], minimum=1),
    )
    t.finish()
    return cfg


def _http(t: _Table) -> HttpConfig:
    d = _defaults(HttpConfig)
    listen = t.text("listen", "127.0.0.1:8080")
    host, _, port_text = listen.rpartition(":")
    port = 8080
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:  # noqa: PLR2004
        t.problems.append(Problem(_join(t.path, "listen"), "must be host:port"))
        host = "127.0.0.1"
    else:
        port = int(port_text)
    public_url = t.text("public_url", None)
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        t.problems.append(Problem(_join(t.path, "public_url"), "must be an http(s) URL"))
        public_url = None
    cfg = HttpConfig(
        host=host.strip("[]"),
        port=port,
        max_body_bytes=t.integer("max_body_bytes", d["max_body_bytes"], minimum=1),
        body_timeout_s=t.number("body_timeout_seconds", d["body_timeout_s"]),
        admin_token=t.text("admin_token", None) or None,
        public_url=public_url.rstrip("/") if public_url else None,
    )
    t.finish()
    return cfg


def _aistudios(t: _Table) -> AIStudiosConfig:
    d = _defaults(AIStudiosConfig)
    sim = t.table("simulator")
    simulator = SimulatorConfig(
        render_seconds=sim.number("render_seconds", _defaults(SimulatorConfig)["render_seconds"]),
        port=sim.integer("port", 0),
    )
    sim.finish()
    app_id = t.text("app_id", None) or None
    user_key = t.text("user_key", None) or None
    if bool(app_id) != bool(user_key):
        t.problems.append(Problem(t.path, "app_id and user_key go together"))
    deadline_s = t.number("render_deadline_seconds", d["render_deadline_seconds"], minimum=1)
    cfg = AIStudiosConfig(
        base_url=t.text("base_url", DEFAULT_V3_BASE_URL).rstrip("/"),
        legacy_base_url=t.text("legacy_base_url", DEFAULT_LEGACY_BASE_URL).rstrip("/"),
        api_key=t.text("api_key", None) or None,
        app_id=app_id,
        user_key=user_key,
        max_concurrent_exports=t.integer(
            "max_concurrent_exports", d["max_concurrent_exports"], minimum=1
        ),
        max_requests_per_second=_optional_rate(t, "max_requests_per_second"),
        request_rate_ceiling=t.number(
            "request_rate_ceiling", d["request_rate_ceiling"], minimum=0.01
        ),
        render_deadline_seconds=deadline_s,
        stall_seconds=t.number("stall_seconds", d["stall_seconds"], minimum=1),
        request_timeout_s=t.number("request_timeout_seconds", d["request_timeout_s"], minimum=0.1),
        reconcile_wait_s=t.number("reconcile_wait_seconds", deadline_s),
        poll_min_interval_s=t.number(
            "poll_min_interval_seconds", d["poll_min_interval_s"], minimum=0.01
        ),
        poll_max_interval_s=t.number(
            "poll_max_interval_seconds", d["poll_max_interval_s"], minimum=0.01
        ),
        first_poll_s=t.number("first_poll_seconds", d["first_poll_s"], minimum=0.01),
        export_settle_s=t.number("export_settle_seconds", d["export_settle_s"], minimum=0.01),
        max_retries=t.integer("max_retries", d["max_retries"]),
        download_hosts=t.str_list("download_hosts"),
        simulator=simulator,
    )
    t.finish()
    return cfg


def _optional_rate(t: _Table, key: str) -> float | None:
    """A rate that stays unset (None) unless the key is given."""
    if key not in t.data:
        return None
    return t.number(key, 0.01, minimum=0.01)


def _store(t: _Table, state_dir: Path) -> StoreConfig:
    url = t.text("url", f"sqlite:///{state_dir / 'studiohook.db'}")
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        t.problems.append(Problem(_join(t.path, "url"), "must be sqlite:///PATH or postgresql://"))
    t.finish()
    return StoreConfig(url=url)


def parse_mqtt_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """Split `mqtt[s]://user:pass@host:port` into its parts."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ValueError("must be mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    port = parts.port or (8883 if tls else 1883)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, tls, user, password


def _mqtt(t: _Table) -> MqttConfig | None:
    d = _defaults(MqttConfig)
    if not t.data:
        return None
    url = t.required_text("url")
    host, port, tls, user, password = "localhost", 1883, False, None, None
    if url:
        try:
            host, port, tls, user, password = parse_mqtt_url(url)
        except ValueError as exc:
            t.problems.append(Problem(_join(t.path, "url"), str(exc)))
    cfg = MqttConfig(
        url=url,
        host=host,
        port=port,
        tls=tls,
        username=user,
        password=password,
        client_id=t.text("client_id", d["client_id"]),
        session_expiry_seconds=t.integer("session_expiry_seconds", d["session_expiry_seconds"]),
        receive_maximum=t.integer("receive_maximum", d["receive_maximum"], minimum=1),
        reader_check_s=t.number("reader_check_seconds", d["reader_check_s"], minimum=0.1),
    )
    t.finish()
    return cfg


def _source(t: _Table) -> SourceConfig:
    d = _defaults(SourceConfig)
    kind = t.text("kind", "json", choices=SOURCE_KINDS)
    cfg = SourceConfig(
        name=t.required_text("name"),
        kind=kind,
        secrets=t.str_list("secrets"),
        topic=t.text("topic", None),
        dedupe_key=t.text("dedupe_key", None),
        signature_header=t.text("signature_header", None),
        signature_encoding=t.text(
            "signature_encoding", "hex", choices=frozenset({"hex", "base64"})
        ),  # type: ignore[arg-type]
        signature_prefix=t.text("signature_prefix", ""),
        token_header=t.text("token_header", d["token_header"]),
    )
    if kind == "mqtt" and not cfg.topic:
        t.problems.append(Problem(_join(t.path, "topic"), "is required for an mqtt source"))
    if kind in {"shopify", "woocommerce", "standard", "hmac", "token"} and not cfg.secrets:
        t.problems.append(Problem(_join(t.path, "secrets"), f"a {kind} source needs a secret"))
    if kind == "hmac" and not cfg.signature_header:
        t.problems.append(Problem(_join(t.path, "signature_header"), "is required for hmac"))
    t.finish()
    return cfg


_API_REQUIRED = (
    'is required with project_id: "v3" for a project saved in today\'s editor '
    '(app.aistudios.com), "legacy" for one saved on the older aistudios.com'
)


def _template(t: _Table, base_dir: Path) -> TemplateConfig:
    name = t.required_text("name")
    file_text = t.text("file", None)
    project_id = t.text("project_id", None) or None
    template_id = t.text("template_id", None) or None
    layout_project_id = t.text("layout_project_id", None) or None
    api = t.text("api", None, choices=TEMPLATE_APIS)
    refresh = t.number("refresh_seconds", 0.0, minimum=1) if "refresh_seconds" in t.data else None
    export_flow = t.text("export_flow", "two-step", choices=EXPORT_FLOWS)
    file = None
    if file_text is not None:
        file = Path(file_text)
        if not file.is_absolute():
            file = base_dir / file
        if not file.is_file():
            t.problems.append(Problem(_join(t.path, "file"), f"{file} does not exist"))
    sources = [
        k
        for k, v in (("file", file_text), ("project_id", project_id), ("template_id", template_id))
        if v is not None
    ]
    if len(sources) != 1:
        found = f" (found {' and '.join(sources)})" if sources else ""
        t.problems.append(
            Problem(t.path, f"needs exactly one of file, project_id or template_id{found}")
        )
    if project_id is not None and api is None and "api" not in t.data:
        t.problems.append(Problem(_join(t.path, "api"), _API_REQUIRED))
    if project_id is None and "api" in t.data:
        t.problems.append(
            Problem(_join(t.path, "api"), "applies only to project_id (a saved project)")
        )
    if layout_project_id is not None and template_id is None:
        t.problems.append(
            Problem(_join(t.path, "layout_project_id"), "applies only to template_id")
        )
    if refresh is not None and project_id is None:
        t.problems.append(
            Problem(
                _join(t.path, "refresh_seconds"), "applies only to project_id (a saved project)"
            )
        )
    t.finish()
    return TemplateConfig(
        name=name,
        file=file,
        project_id=project_id,
        api=api,  # type: ignore[arg-type]
        template_id=template_id,
        layout_project_id=layout_project_id,
        refresh_seconds=refresh,
        export_flow=export_flow,
    )


def _route(t: _Table) -> RouteConfig:
    patches_table = t.table("patches")
    patches = []
    for selector, expression in patches_table.data.items():
        patches_table.used.add(selector)
        if not isinstance(expression, str):
            t.problems.append(Problem(_join(patches_table.path, selector), "must be a string"))
            continue
        patches.append((selector, expression))
    cfg = RouteConfig(
        name=t.required_text("name"),
        source=t.required_text("source"),
        template=t.required_text("template"),
        events=t.str_list("events"),
        when=t.text("when", None),
        handler=t.text("handler", None),
        patches=tuple(patches),
        export_name=t.text("export_name", None),
        download=t.boolean("download", default=False),
        max_exports_per_day=_optional_count(t, "max_exports_per_day"),
        coalesce_key=t.text("coalesce_key", None),
        coalesce_seconds=t.number("coalesce_seconds", 0.0),
        cache_seconds=t.number("cache_seconds", 0.0, minimum=1.0)
        if "cache_seconds" in t.data
        else None,
    )
    t.finish()
    return cfg


def _optional_count(t: _Table, key: str) -> int | None:
    """A cap that stays unset (None) unless the key is given; 0 holds every export."""
    if key not in t.data:
        return None
    return t.integer(key, 0)


def _budget(t: _Table) -> BudgetConfig:
    cfg = BudgetConfig(
        exports_per_day=_optional_count(t, "exports_per_day"),
        exports_per_month=_optional_count(t, "exports_per_month"),
    )
    t.finish()
    return cfg


def _notify(t: _Table, base_dir: Path, index: int) -> NotifyConfig:
    d = _defaults(NotifyConfig)
    kind = t.text("kind", "", choices=NOTIFY_KINDS)
    if "kind" not in t.data:
        t.problems.append(Problem(_join(t.path, "kind"), "is required"))
    events = t.str_list("events") or DEFAULT_NOTIFY_EVENTS
    for i, event in enumerate(events):
        if event not in NOTIFY_EVENTS:
            allowed = ", ".join(sorted(NOTIFY_EVENTS))
            t.problems.append(
                Problem(f"{_join(t.path, 'events')}[{i}]", f"must be one of {allowed}")
            )
    path_text = t.text("path", None)
    path = None
    if path_text is not None:
        path = Path(path_text) if Path(path_text).is_absolute() else base_dir / path_text
    cfg = NotifyConfig(
        name=t.text("name", f"{kind}-{index}"),
        kind=kind,
        events=events,
        topic=t.text("topic", d["topic"]),
        url=t.text("url", None),
        secret=t.text("secret", None),
        path=path,
        download=t.boolean("download", default=False),
    )
    if kind == "webhook" and not cfg.url:
        t.problems.append(Problem(_join(t.path, "url"), "is required for a webhook target"))
    if kind == "webhook" and cfg.secret and not cfg.secret.startswith("whsec_"):
        t.problems.append(Problem(_join(t.path, "secret"), "must be a whsec_ secret"))
    if kind == "file" and path is None:
        t.problems.append(Problem(_join(t.path, "path"), "is required for a file target"))
    t.finish()
    return cfg


def _unique(items: list[Any], what: str, problems: list[Problem]) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.name in seen:
            problems.append(Problem(f"{what}[{i}].name", f"duplicate name {item.name!r}"))
        seen.add(item.name)


def _cross_check(cfg: Config, problems: list[Problem]) -> None:
    sources = {s.name for s in cfg.sources}
    templates = {t.name for t in cfg.templates}
    for i, route in enumerate(cfg.routes):
        if route.source and route.source not in sources:
            problems.append(Problem(f"routes[{i}].source", f"no source named {route.source!r}"))
        if route.template and route.template not in templates:
            problems.append(
                Problem(f"routes[{i}].template", f"no template named {route.template!r}")
            )
    needs_mqtt = any(s.kind == "mqtt" for s in cfg.sources) or any(
        n.kind == "mqtt" for n in cfg.notify
    )
    if needs_mqtt and cfg.mqtt is None:
        problems.append(Problem("mqtt", "an mqtt source or notify target needs an [mqtt] section"))


def parse_config(
    data: dict[str, Any], path: Path, env: dict[str, str] | None = None
) -> tuple[Config, list[Problem]]:
    """Build a Config from parsed TOML; return it with every problem found."""
    problems: list[Problem] = []
    data = _expand_tree(data, dict(os.environ) if env is None else env, "", problems)
    base_dir = path.parent.resolve()
    root = _Table(data, "", problems)
    service = _service(root.table("service"), base_dir)
    cfg = Config(
        path=path,
        service=service,
        http=_http(root.table("http")),
        aistudios=_aistudios(root.table("aistudios")),
        store=_store(root.table("store"), service.state_dir),
        mqtt=_mqtt(root.table("mqtt")),
        sources=tuple(_source(t) for t in root.array_of_tables("sources")),
        templates=tuple(_template(t, base_dir) for t in root.array_of_tables("templates")),
        routes=tuple(_route(t) for t in root.array_of_tables("routes")),
        notify=tuple(_notify(t, base_dir, i) for i, t in enumerate(root.array_of_tables("notify"))),
        budget=_budget(root.table("budget")),
    )
    root.finish()
    _unique(list(cfg.sources), "sources", problems)
    _unique(list(cfg.templates), "templates", problems)
    _unique(list(cfg.routes), "routes", problems)
    _unique(list(cfg.notify), "notify", problems)
    _cross_check(cfg, problems)
    return cfg, problems


def config_path(explicit: str | None) -> Path:
    """`--config`, else `$STUDIOHOOK_CONFIG`, else `./config.toml`."""
    return Path(explicit or os.environ.get("STUDIOHOOK_CONFIG") or "config.toml")


def read_config(path: Path, env: dict[str, str] | None = None) -> tuple[Config, list[Problem]]:
    """Read a config file and return it with its problems (`check` goes on to look deeper).

    Raises ConfigError only when there is nothing to look at: unreadable file, invalid TOML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid TOML: {exc}")]) from exc
    return parse_config(data, path, env)


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    cfg, problems = read_config(path, env)
    if problems:
        raise ConfigError(problems)
    return cfg
