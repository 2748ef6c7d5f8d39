"""The settings registry: each setting is declared once, and the INI reader, the environment
reader, the CLI flags, `print-config`, etc/reconciler.ini and the README table all derive from it.

Layers, later wins: defaults -> INI file (-c/--config) -> credential files -> RECONCILER_<SECTION>_<KEY>
env -> CLI flags.

Credential files keep secrets out of the INI file, the unit and the environment: a file named like
the setting's environment variable (RECONCILER_NETBOX_TOKEN, RECONCILER_POSTGRES_DSN, ...) in
$CREDENTIALS_DIRECTORY, which systemd's LoadCredential= fills (etc/systemd/reconciler.service).
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/reconciler/reconciler.ini"
CONFIG_PATH_ENV = "RECONCILER_CONFIG"
ENV_PREFIX = "RECONCILER_"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential=
PLUGIN_CONNECT_SECONDS = 5.0  # connect timeout of a plugin request (the read timeout is a setting)
LEASE_RECORD_MARGIN = 30.0  # seconds of a lease kept for recording a batch's outcome after the plugin's answer


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError ---


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    parse.__doc__ = f"integer >= {minimum}"
    return parse


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def float_at_least(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not value >= minimum:  # NaN fails too
            raise ValueError(f"must be >= {minimum:g}, got {raw.strip()}")
        return value

    return parse


def seconds_above_zero(raw: str) -> float:
    value = float(raw.strip())
    if value <= 0:
        raise ValueError(f"must be > 0 seconds, got {raw.strip()}")
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {raw!r}")
        return value

    parse.__doc__ = " | ".join(choices)
    return parse


def url_with_scheme(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value == "" and "" in schemes:
            return value
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            allowed = ", ".join(s + "://" for s in schemes if s)
            raise ValueError(f"expected a URL starting with {allowed}; got {value!r}")
        return value

    return parse


def sql_identifier(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        raise ValueError(f"expected a lower-case SQL identifier, got {raw!r}")
    return value


def non_empty(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def any_text(raw: str) -> str:
    return raw.strip()


def listen_address(raw: str) -> str:
    """host:port ([v6]:port), port 0 for any free one; empty or off: not listening."""
    value = raw.strip()
    if value.lower() in ("", "off", "false", "no", "none"):
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or (":" in host and not host.startswith("[")):
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464, [::1]:9464) or off; got {raw!r}")
    return value


def mask_url_password(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.password is None:
        return value
    netloc = parts.netloc.replace(":" + parts.password + "@", ":****@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def mask_dsn_password(value: str) -> str:
    if "://" in value:
        return mask_url_password(value)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1****", value)


def mask_all(value: str) -> str:
    return "****" if value else ""


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    flags: tuple[str, ...] = ()
    mask: Callable[[str], str] | None = None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section}_{self.key}".upper()

    @property
    def dest(self) -> str:
        return f"{self.section}__{self.key}"

    def render(self, value: Any) -> str:
        """The INI spelling of a value (what `print-config` shows and the INI file holds)."""
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        return self.mask(text) if self.mask and text else text


SETTINGS: tuple[Setting, ...] = (
    # [redis]
    Setting("redis", "url", "redis://127.0.0.1:6379/1", url_with_scheme("redis", "rediss", "unix"),
            "Redis holding the ingest stream. The db index in the path is the ingester's "
            "REDIS_STREAM_DB (1 by default); user:password in the URL for ACL/AUTH.",
            mask=mask_url_password),
    Setting("redis", "stream", "diode.v1.ingest-stream", non_empty,
            "Stream key the diode ingester XADDs IngestRequests to."),
    Setting("redis", "group", "diode-reconciler", non_empty,
            "Consumer group. Created at the start of the stream if missing, so entries already "
            "in the stream are read, not skipped. Keep the Go reconciler's name to take over its group."),
    Setting("redis", "read_count", 25, int_at_least(1),
            "Stream entries per XREADGROUP; the entities of one read are written in one Postgres "
            "transaction (one COPY).", flags=("--read-count",)),
    Setting("redis", "block_ms", 500, int_at_least(1),
            "How long one read waits for new entries (ms). Bounds how quickly the consumer notices a stop."),
    Setting("redis", "reclaim_idle_seconds", 60.0, seconds_above_zero,
            "Entries pending this long with another (dead) consumer are taken over with XAUTOCLAIM."),
    Setting("redis", "max_request_bytes", 16 * 1024 * 1024, int_at_least(1024),
            "Largest IngestRequest accepted, after brotli decompression; larger entries become dead letters."),
    Setting("redis", "max_entities", 1000, int_at_least(1),
            "Most entities one IngestRequest may carry (the diode.v1 schema's limit); more is a dead letter."),
    # [postgres]
    Setting("postgres", "dsn", "postgresql://postgres@127.0.0.1:5432/reconciler", non_empty,
            "libpq connection string or URL of the inbox database.", mask=mask_dsn_password),
    Setting("postgres", "schema", "reconciler", sql_identifier,
            "Schema holding reconciler's tables, so it can share a database with the Go reconciler's public tables."),
    Setting("postgres", "migrate_on_start", True, parse_bool,
            "Apply pending migrations when `reconciler run` starts (safe with several replicas)."),
    # [workers]
    Setting("workers", "count", 2, int_at_least(0),
            "Poll-worker processes. 0 runs the stream consumer alone.", flags=("-w", "--workers")),
    Setting("workers", "batch_size", 100, int_between(1, 10_000),
            "Rows one poll worker claims and sends to the plugin per request (at most 10,000).",
            flags=("--batch-size",)),
    Setting("workers", "auto_apply", True, parse_bool,
            "true: plan and apply in one /bulk-plan-apply/ call; false: plan only (/bulk-plan/), rows wait in OPEN "
            "for review."),
    Setting("workers", "lease_seconds", 600.0, seconds_above_zero,
            "How long a claim is held. The rows of a worker that died return to QUEUED as soon as its supervisor "
            "reaps it (once NetBox can no longer be working on a request it sent); those of a worker that died "
            "unseen (another host, the whole service killed) after the lease plus [netbox] "
            "server_timeout_seconds (ERRORED after [workers] max_attempts such expiries). No plugin request "
            "starts that could outlast the lease, less a tenth "
            "(at most 30 s) kept to record the outcome: that must hold one request (5 s connect + [netbox] "
            "timeout_seconds; two with token_url), and the lease must exceed [netbox] timeout_seconds x "
            "max_attempts."),
    Setting("workers", "max_attempts", 8, int_at_least(1),
            "Claims of one row (plugin unreachable, 5xx, 429, timeouts) before it becomes ERRORED; also how many "
            "times its claim may outlive the lease (a worker died or hung planning it)."),
    Setting("workers", "retry_base_seconds", 30.0, seconds_above_zero,
            "First delay of a row in PENDING_RETRY; doubles with each attempt, with jitter."),
    Setting("workers", "retry_max_seconds", 3600.0, seconds_above_zero, "Longest delay of a row in PENDING_RETRY."),
    Setting("workers", "backpressure_threshold", 1000, int,
            "Workers pause while the consumer group's lag plus pending entries exceed this (<= 0: never pause)."),
    # [netbox]
    Setting("netbox", "url", "http://127.0.0.1:8000/api/plugins/diode", url_with_scheme("http", "https"),
            "Base URL of the diode plugin API (endpoints are appended with a trailing slash)."),
    Setting("netbox", "token_url", "", url_with_scheme("", "http", "https"),
            "OAuth2 token endpoint for the client-credentials grant (empty: use the static token)."),
    Setting("netbox", "client_id", "", any_text, "OAuth2 client id."),
    Setting("netbox", "client_secret_file", "", any_text,
            "File holding the OAuth2 client secret (e.g. a systemd credential); never logged."),
    Setting("netbox", "client_secret", "", any_text,
            "OAuth2 client secret when no file is used; prefer the environment to the INI file.", mask=mask_all),
    Setting("netbox", "token", "", any_text,
            "Static bearer token for simple deployments, used when token_url is empty.", mask=mask_all),
    Setting("netbox", "api", "auto", one_of("auto", "bulk", "single"),
            "auto: bulk endpoints, falling back to generate-diff/ + apply-change-set/ per entity when they answer "
            "404 (plugin < 1.12); bulk or single: always that."),
    Setting("netbox", "timeout_seconds", 60.0, seconds_above_zero,
            "Read timeout of one request to the plugin (a batch of 100 fresh entities takes ~5 s on NetBox)."),
    Setting("netbox", "server_timeout_seconds", 300.0, seconds_above_zero,
            "The longest NetBox may work on one request, counted from when we stopped waiting for its answer "
            "(it may have sat in a queue until then). A batch whose answer never came (read timeout, dropped "
            "connection, a gateway's 502/504) is not sent again before this has passed, so that no entity is "
            "planned or applied by two requests at once; the rows of a worker that died unseen wait this long "
            "after their lease too. NetBox itself sets no such limit with gunicorn's threaded workers (its "
            "default), so this is the bound you assert: a bulk request takes seconds, and 300 s is far "
            "beyond any sane one; raise it if yours can run longer."),
    Setting("netbox", "max_attempts", 4, int_at_least(1),
            "Attempts per request on connection errors, 429 and 5xx answers (backoff, Retry-After honoured). "
            "A request whose answer never came is not repeated (see server_timeout_seconds)."),
    Setting("netbox", "rate_limit_per_second", 20.0, float,
            "Requests per second to the plugin, shared by all workers (<= 0: unlimited)."),
    Setting("netbox", "rate_limit_burst", 4, int_at_least(1), "Requests that may go at once within the rate limit."),
    Setting("netbox", "verify_tls", True, parse_bool, "Verify the plugin's TLS certificate (https URLs)."),
    Setting("netbox", "branch_refresh_seconds", 300.0, seconds_above_zero,
            "How often the refresher asks the plugin for its default branch."),
    Setting("netbox", "api_token", "", any_text,
            "NetBox REST API token (NetBox's own, not the plugin's) that may read the change log, for [drift] "
            "mode changes; read access to sites, devices and virtual machines as well makes the rule finer (an "
            "interface edited by hand then re-plans that device's interface, not every interface of its "
            "name; a device, rack or VLAN, those of its site). "
            "NetBox's URL is [netbox] url without /api/plugins/diode. Empty: every re-observation is "
            "planned again, as with mode always.", mask=mask_all),
    # [drift]
    Setting("drift", "mode", "changes", one_of("always", "changes", "never"),
            "What an unchanged re-observation of an APPLIED or NO_CHANGES entity costs. always: it is planned "
            "again (the Go reconciler's rule: an edit or delete by hand in NetBox is undone at the next "
            "discovery, but every discovery run re-plans the whole inventory). changes (default): it is planned "
            "again only when NetBox's change log shows a change by someone other than the plugin to an object "
            "it names since it was last planned; otherwise it only counts the observation. Needs [netbox] "
            "api_token, and behaves as always (and says so) while the change log cannot be read. never: "
            "never planned again until max_age_hours."),
    Setting("drift", "max_age_hours", 24.0, float_at_least(0.0),
            "An unchanged entity last planned longer ago than this is planned again whatever the change log "
            "says: it covers what the change log cannot (a NetBox restored from a backup, changes made with "
            "change logging off, a high-water mark older than NetBox's CHANGELOG_RETENTION, which must be "
            "longer). A day puts back anything missed within a day, at 1/24 of mode always's cost for hourly "
            "discovery. 0: no floor."),
    Setting("drift", "poll_seconds", 10.0, seconds_above_zero,
            "How often NetBox's change log is read. A re-observation waits for the next read (plus "
            "clock_margin_seconds) before it is settled, so this is also the delay it adds."),
    Setting("drift", "clock_margin_seconds", 60.0, float_at_least(0.0),
            "Slack for NetBox transactions still committing and for NetBox's clock against Postgres': each "
            "read of the change log starts this long before the last one ended, a re-observation is settled "
            "once the change log was read this long past it, and a change stamped this long before a row's "
            "last plan still counts as after it. A change NetBox stamped longer than this before its "
            "transaction committed (a bulk edit, import or script running longer) can be missed until "
            "max_age_hours: raise it if yours run longer. Clocks further apart than this stop the checks "
            "(as mode always) until they agree."),
    Setting("drift", "plugin_user", "diode", non_empty,
            "The NetBox user the diode plugin writes as: its changes are the reconciler's own, not drift."),
    # [retention]
    Setting("retention", "superseded_rows_days", 30.0, float_at_least(0.0),
            "Days a finished row (APPLIED, FAILED, NO_CHANGES, IGNORED, ERRORED) is kept once it is no longer its "
            "entity's current row (a drift re-plan or a new default branch replaced it), counted from its last "
            "change; then it goes with its change sets. The current row says what NetBox was last told; a "
            "superseded one only explains the past, and a month covers noticing and looking into an incident. "
            "Current, QUEUED, OPEN and in-flight rows are never deleted. 0: kept for ever."),
    Setting("retention", "superseded_change_sets_days", 30.0, float_at_least(0.0),
            "Days a change set is kept after a newer plan of its row superseded it (each row keeps at most 5); a "
            "row's latest change set stays as long as the row. 0: kept for ever."),
    Setting("retention", "dead_letters_days", 90.0, float_at_least(0.0),
            "Days a dead letter is kept, replayed or not: data that never arrived, so longer than rows (a quarter) "
            "to be noticed, fixed at the source and replayed (`reconciler dead-letters`). 0: kept for ever."),
    Setting("retention", "interval_seconds", 600.0, seconds_above_zero,
            "How often the retention process looks for what may go. It deletes in small transactions of at most "
            "1,000, in id order, skipping rows anyone holds, and rests three times as long as each took, so the "
            "consumer and the workers keep most of Postgres."),
    # [api]
    Setting("api", "listen", "127.0.0.1:8081", listen_address,
            "host:port of the read API, gRPC diode.v1.ReconcilerService (the Go reconciler's port), with server "
            "reflection and grpc.health.v1; empty or off: not served.", flags=("--api-listen",)),
    Setting("api", "auth", "gateway", one_of("gateway", "introspect", "token"),
            "How the read API checks the bearer token of each call. gateway: the diode gateway in front has "
            "verified it; the JWT's scope claim must hold [api] scope, its signature is not checked (the Go "
            "reconciler's way). Anyone who can reach the port can forge such a token, so gateway mode is refused "
            "unless listen is a loopback address. introspect: each token is checked with [api] introspect_url "
            "(OAuth2 introspection, RFC 7662), the answer kept until the token expires; safe on any address. "
            "token: the token must equal the one in [api] token_file."),
    Setting("api", "scope", "diode:read", non_empty,
            "The OAuth2 scope a token must carry (auth gateway and introspect)."),
    Setting("api", "introspect_url", "", url_with_scheme("", "http", "https"),
            "OAuth2 introspection endpoint (auth introspect), e.g. Diode auth's "
            "https://diode.example.net/diode/auth/introspect; https unless it is on loopback, since it is sent "
            "every caller's token (in the form field token, and as the bearer when no client id is set)."),
    Setting("api", "introspect_client_id", "", any_text,
            "Client id the reconciler authenticates itself with to the introspection endpoint (HTTP Basic, as RFC "
            "7662 asks of a protected resource); empty: none, as Diode's auth service expects."),
    Setting("api", "introspect_client_secret_file", "", any_text,
            "File holding that client's secret (e.g. a systemd credential); never logged."),
    Setting("api", "token_file", "", any_text,
            "File holding the one token the read API accepts (auth token), e.g. a systemd credential; never "
            "logged. Re-read on SIGHUP."),
    Setting("api", "threads", 4, int_between(1, 64),
            "Calls the read API answers at once, each with its own Postgres connection; more wait their turn."),
    # [supervisor]
    Setting("supervisor", "drain_seconds", 75.0, seconds_above_zero,
            "On stop, how long children may finish their batch before they are killed. Above one plugin "
            "request (5 s connect + [netbox] timeout_seconds), so a batch in flight can finish."),
    Setting("supervisor", "max_boot_failures", 5, int_at_least(1),
            "Consecutive boot failures of one child before the supervisor gives up (exit 3)."),
    Setting("supervisor", "heartbeat_timeout_seconds", 120.0, seconds_above_zero,
            "A child whose loop has not ticked for this long is considered hung and killed. Must exceed one "
            "plugin request (5 s connect + [netbox] timeout_seconds) when workers run."),
    # [metrics]
    Setting("metrics", "listen", "127.0.0.1:9464", listen_address,
            "host:port of the HTTP endpoint with /metrics (Prometheus), /healthz and /readyz, served by the "
            "supervisor; empty or off: none. Read at start (a SIGHUP does not move it)."),
    # [log]
    Setting("log", "level", "info", one_of("debug", "info", "warning", "error"),
            "Log level.", flags=("--log-level",)),
    Setting("log", "format", "text", one_of("text", "json"), "Log lines as text or one JSON object per line."),
    Setting("log", "outage_reminder_seconds", 300.0, seconds_above_zero,
            "While Postgres, Redis, the plugin or its token endpoint stays down, the ERROR line saying so is "
            "repeated this often (it is also logged when the outage begins and when it ends)."),
)

BY_NAME = {s.name: s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))


def _section_namespaces(values: Mapping[str, Any]) -> dict[str, SimpleNamespace]:
    grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        section, key = name.split(".", 1)
        grouped[section][key] = value
    return {section: SimpleNamespace(**keys) for section, keys in grouped.items()}


@dataclass(frozen=True)
class Config:
    """Validated, frozen settings: `cfg.redis.url`. Built before any fork and handed to children."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    path: str | None = None
    _sections: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._sections.update(_section_namespaces(self.values))

    def __getattr__(self, section: str) -> SimpleNamespace:
        if section.startswith("_"):  # copy/pickle probe dunders before __dict__ exists
            raise AttributeError(section)
        try:
            return self._sections[section]
        except KeyError:
            raise AttributeError(section) from None

    def replace(self, **overrides: Any) -> Config:
        """A copy with some values changed, e.g. replace(**{"workers.count": 0})."""
        values = dict(self.values)
        for name, value in overrides.items():
            if name not in BY_NAME:
                raise KeyError(name)
            values[name] = value
        return Config(values=values, sources=dict(self.sources), path=self.path)


def _apply(setting: Setting, raw: str, where: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_ini(path: str) -> configparser.ConfigParser:
    # Interpolation off: secrets and DSNs may legitimately contain '%'.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is not valid INI: {exc.message}") from None
    return parser


def _ini_layer(path: str) -> dict[str, tuple[str, str]]:
    parser = _read_ini(path)
    found: dict[str, tuple[str, str]] = {}
    for section in parser.sections():
        for key, raw in parser.items(section, raw=True):
            name = f"{section}.{key}"
            if name not in BY_NAME:
                known = ", ".join(s.key for s in SETTINGS if s.section == section)
                hint = f" (known keys in [{section}]: {known})" if known else f" (no section [{section}])"
                raise ConfigError(f"{path}: unknown setting [{section}] {key}{hint}")
            found[name] = (raw, f"{path}: [{section}] {key}")
    return found


def _env_layer(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    by_env = {s.env: s for s in SETTINGS}
    found: dict[str, tuple[str, str]] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_PATH_ENV:
            continue
        setting = by_env.get(var)
        if setting is None:
            raise ConfigError(f"unknown environment variable {var} (settings are RECONCILER_<SECTION>_<KEY>)")
        found[setting.name] = (raw, f"environment {var}")
    return found


def _credentials_layer(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    directory = environ.get(CREDENTIALS_DIRECTORY_ENV)
    if not directory:
        return {}
    found: dict[str, tuple[str, str]] = {}
    for setting in SETTINGS:
        path = os.path.join(directory, setting.env)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                raw = handle.read().rstrip("\r\n")  # editors end files with a newline; values never do
        except OSError as exc:
            raise ConfigError(f"cannot read credential {path}: {exc.strerror}") from None
        found[setting.name] = (raw, f"credential {path}")
    return found


def config_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[str | None, bool]:
    """The INI path to read and whether it must exist (only the built-in default may be absent)."""
    if explicit:
        return explicit, True
    if environ.get(CONFIG_PATH_ENV):
        return environ[CONFIG_PATH_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load(path: str | None = None, environ: Mapping[str, str] | None = None,
         cli: Mapping[str, str] | None = None) -> Config:
    """Resolve every setting through the layers and validate it; raises ConfigError naming the key."""
    environ = os.environ if environ is None else environ
    ini_path, required = config_path(path, environ)
    layers: list[dict[str, tuple[str, str]]] = []
    if ini_path and (required or os.path.exists(ini_path)):
        layers.append(_ini_layer(ini_path))
    else:
        ini_path = None
    layers.append(_credentials_layer(environ))
    layers.append(_env_layer(environ))
    layers.append({name: (raw, f"command line {BY_NAME[name].flags[-1]}") for name, raw in (cli or {}).items()})
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    for layer in layers:
        for name, (raw, where) in layer.items():
            values[name] = _apply(BY_NAME[name], raw, where)
            sources[name] = where
    config = Config(values=values, sources=sources, path=ini_path)
    check_consistency(config)
    return config


PLUGIN_PATH = "/api/plugins/diode"


def netbox_base_url(netbox) -> str:
    """NetBox's own URL, for its REST API: [netbox] url less the plugin's path."""
    url = netbox.url.rstrip("/")
    if not url.endswith(PLUGIN_PATH):
        raise ConfigError(f"[netbox] api_token: NetBox's URL is [netbox] url less {PLUGIN_PATH}, and {netbox.url} "
                          f"does not end with it")
    return url[:-len(PLUGIN_PATH)]


def check_consistency(config: Config) -> None:
    """Rules that span several settings."""
    if config.netbox.api_token:
        netbox_base_url(config.netbox)
    if config.netbox.client_secret_file:
        require_readable("[netbox] client_secret_file", config.netbox.client_secret_file)
    if config.netbox.token_url and not config.netbox.client_id:
        raise ConfigError("[netbox] client_id: required when [netbox] token_url is set")
    check_api(config.api)


def check_api(api) -> None:
    """The read API's auth needs what its mode names, and gateway mode only a loopback address."""
    if not api.listen:
        return
    if api.auth == "gateway" and not is_loopback(api.listen):
        raise ConfigError(f"[api] auth gateway trusts any token that names [api] scope, unverified; [api] listen "
                          f"{api.listen} is not a loopback address, so anyone who reaches it could read the inbox: "
                          f"use auth introspect (or token), or listen on 127.0.0.1")
    if api.auth == "introspect":
        check_introspection(api)
    if api.auth == "token":
        if not api.token_file:
            raise ConfigError("[api] token_file: required with [api] auth token")
        require_readable("[api] token_file", api.token_file)


def check_introspection(api) -> None:
    if not api.introspect_url:
        raise ConfigError("[api] introspect_url: required with [api] auth introspect")
    parts = urllib.parse.urlsplit(api.introspect_url)
    if parts.scheme != "https" and not is_loopback_host(parts.hostname or ""):
        raise ConfigError(f"[api] introspect_url {api.introspect_url}: every caller's token is sent there, so it "
                          f"must be https unless it is on this host's loopback")
    if api.introspect_client_id:
        require_readable("[api] introspect_client_secret_file", api.introspect_client_secret_file,
                         " (required with [api] introspect_client_id)")


def require_readable(setting: str, path: str, why: str = "") -> None:
    """A file a setting names (a secret, a token) must be readable before anything starts."""
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{setting}: cannot read {path}{why}")


def read_secret_file(path: str) -> str:
    """A secret from the file a setting names, without the newline (or spaces) editors leave around it."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def is_loopback(listen: str) -> bool:
    """Whether a host:port listens on the loopback interface only (localhost counts)."""
    return is_loopback_host(listen.rpartition(":")[0].strip("[]"))


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_runnable(config: Config) -> None:
    """What `run` needs beyond well-formed values: credentials for the plugin when workers run."""
    netbox = config.netbox
    if config.workers.count > 0 and not (netbox.token or netbox.token_url):
        raise ConfigError("[netbox] token or [netbox] token_url is required when [workers] count > 0")
    if netbox.token_url and not (netbox.client_secret or netbox.client_secret_file):
        raise ConfigError("[netbox] client_secret_file (or client_secret) is required with [netbox] token_url")
    worst_call = netbox.timeout_seconds * netbox.max_attempts
    if config.workers.lease_seconds <= worst_call:
        raise ConfigError(f"[workers] lease_seconds ({config.workers.lease_seconds:g}) must exceed [netbox] "
                          f"timeout_seconds x max_attempts ({worst_call:g}), or live claims would be taken over")
    longest_request = plugin_request_seconds(netbox)
    budget = lease_budget_seconds(config.workers)
    needed, what = (2 * longest_request, "a token request and one request") if netbox.token_url else \
        (longest_request, "one request")
    if config.workers.count > 0 and budget <= needed:
        raise ConfigError(f"[workers] lease_seconds ({config.workers.lease_seconds:g}) leaves {budget:g} s for plugin "
                          f"requests once the time to record the outcome is kept, not enough for {what} "
                          f"({needed:g} s): no batch could ever be sent")
    if config.workers.count > 0 and config.supervisor.heartbeat_timeout_seconds <= longest_request:
        raise ConfigError(f"[supervisor] heartbeat_timeout_seconds ({config.supervisor.heartbeat_timeout_seconds:g}) "
                          f"must exceed one plugin request (connect and [netbox] timeout_seconds: "
                          f"{longest_request:g} s), or a worker waiting for NetBox is killed as hung")


def lease_budget_seconds(workers) -> float:
    """How long after a claim its plugin requests may run: the lease, less the time kept to record
    the outcome (a tenth of the lease, at most LEASE_RECORD_MARGIN)."""
    return workers.lease_seconds - min(LEASE_RECORD_MARGIN, workers.lease_seconds / 10)


def claim_lease_seconds(config: Config) -> float:
    """The lease a claim is written with: [workers] lease_seconds, within which its requests are sent and
    answered, plus the time NetBox may go on working on the last of them after we stopped waiting."""
    return config.workers.lease_seconds + config.netbox.server_timeout_seconds


def plugin_connect_seconds(netbox) -> float:
    """Connect timeout of a plugin request: 5 s, or the read timeout if that is shorter."""
    return min(PLUGIN_CONNECT_SECONDS, netbox.timeout_seconds)


def plugin_request_seconds(netbox) -> float:
    """The longest one plugin request can take: connecting, then reading."""
    return plugin_connect_seconds(netbox) + netbox.timeout_seconds


def advisories(config: Config) -> list[str]:
    """Settings that work but probably not as meant: logged at start and reload, printed by check-config."""
    notes = []
    longest_request = plugin_request_seconds(config.netbox)
    if config.workers.count > 0 and config.supervisor.drain_seconds < longest_request:
        notes.append(f"[supervisor] drain_seconds ({config.supervisor.drain_seconds:g}) is shorter than one plugin "
                     f"request ({longest_request:g} s): a worker stopped during a slow request is killed, and its "
                     f"rows wait until NetBox can no longer be working on that request ([netbox] "
                     f"server_timeout_seconds, {config.netbox.server_timeout_seconds:g} s) before they are "
                     f"planned again")
    return notes


def consumer_name(prefix: str = "diode-reconciler") -> str:
    """One consumer name per host and process, so replicas and restarts never share a PEL."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}"


# --- documentation derived from the registry ---


def _wrap_comment(text: str, width: int = 96) -> Iterable[str]:
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            yield line
            line = "#"
        line += " " + word
    yield line


def render_ini(config: Config | None = None) -> str:
    """An INI file with every setting, its help as a comment, and its value (default or effective)."""
    out = ["# reconciler configuration. Every key is also RECONCILER_<SECTION>_<KEY> in the environment.",
           "# Values shown are the defaults; uncomment and change what you need."]
    for section in SECTIONS:
        out += ["", f"[{section}]"]
        for setting in (s for s in SETTINGS if s.section == section):
            out += list(_wrap_comment(setting.help))
            if config is None:
                out.append(f"# {setting.key} = {setting.render(setting.default)}")
            else:
                out.append(f"{setting.key} = {setting.render(config.values[setting.name])}")
    return "\n".join(out) + "\n"


def render_markdown_table() -> str:
    rows = ["| INI `[section] key` | environment | flag | default | meaning |",
            "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = s.render(s.default) or "(empty)"
        flags = ", ".join(f"`{f}`" for f in s.flags)
        rows.append(f"| `[{s.section}] {s.key}` | `{s.env}` | {flags} | `{default}` | {s.help} |")
    return "\n".join(rows) + "\n"
