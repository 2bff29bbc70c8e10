"""The one typed settings object, read from the environment once and passed down.

Every process of the service builds it with :func:`load_settings` at start-up,
and the service's code takes its configuration from it, never from
``os.environ``. Two places touch the environment besides: ``core/metrics.py``
hands ``settings.metrics_dir`` to prometheus-client, which reads its directory
only from ``PROMETHEUS_MULTIPROC_DIR`` (it sets that variable, for the
processes it starts, unless it is already set); and the command-line tools of
``scripts/`` (stack, benchmarks, k6 runs, CLIs) read ``REDIS_URL`` / ``MONGO_URL``
to decide which servers to start, and pass their environment on to the
processes they start, which then load their settings from it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

ROLES = frozenset({"http", "flusher", "rollups"})
AUTH_MODES = ("keys", "open")
KEY_SCOPES = ("write", "read", "admin")


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    # what this host runs: any of http, flusher, rollups
    roles: frozenset[str] = ROLES
    # servers; empty means "the stack controller starts its own under var_dir"
    redis_url: str = ""
    redis_cluster: bool = False  # REDIS_URL names one node of a Redis Cluster
    mongo_url: str = ""
    var_dir: Path = Path("var")
    mongo_db: str = "events_service"
    stream_key: str = "events:ingest"
    # streams spread over Redis Cluster slots (hash tags); a batch goes whole to one
    stream_partitions: int = 1
    # names this host's flushers in the consumer group; empty: "<hostname>:<port>"
    instance_name: str = ""
    # request limits
    max_body_bytes: int = 1024 * 1024
    max_batch_events: int = 1000
    max_future_seconds: int = 300
    max_metadata_bytes: int = 8 * 1024
    max_metadata_depth: int = 8
    # a batch's timestamps move by received - sent_at only beyond this (0: always)
    clock_skew_threshold_seconds: float = 60.0
    # backpressure: events waiting in the stream (accepted, not yet in MongoDB)
    queue_max_events: int = 1_000_000
    retry_after_seconds: int = 1
    # events per second per API key (or client address when keys are off); 0 = off
    rate_limit_events_per_second: int = 0
    # per-account quotas (service/quotas.py; a key may carry its own): events per
    # second per account (0: off), distinct types per account per UTC day (0: off),
    # distinct accounts a multi-account key may write per hour (0: off)
    account_events_per_second: int = 0
    account_types_per_day: int = 1000
    key_accounts_per_hour: int = 0
    # "keys": every data route needs an API key (stored ones, scripts/keys.py, or
    # API_KEYS); "open": none, the write key / account names the account. Empty: keys
    # when API_KEYS is set, else open on a loopback HOST, else a refusal to start
    auth: str = ""
    # bootstrap keys, "key=acc_1|acc_2,key2=*@admin": key -> (scope, accounts); an
    # entry without "@scope" may read and write its accounts
    api_keys: Mapping[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    # how often each HTTP worker asks Redis whether stored keys changed
    keys_refresh_seconds: float = 0.5
    # web pages allowed to call the service (CORS), "*" or origins like
    # "https://app.example.com": writing (ingestion and SDK config routes) is open
    # to every page by default, since write keys sit in pages anyway; reading
    # (/summary, /timeseries, /stream) to none but the service's own
    cors_write_origins: frozenset[str] = frozenset({"*"})
    cors_read_origins: frozenset[str] = frozenset()
    cors_max_age_seconds: int = 86_400
    # GET /stream, per HTTP worker: clients at once, and how many flushes' worth of
    # events a client may fall behind before it is dropped
    stream_max_clients: int = 100
    stream_buffer_flushes: int = 256
    # flusher
    flushers: int = 1
    # events per flush, at most MAX_FLUSH_BATCH_SIZE: one insert_many and one
    # acknowledge script (which blocks Redis while it runs) per flush
    flush_batch_size: int = 500
    flush_interval_ms: int = 250
    # flushes in flight per flusher: the store takes more than one write at once
    # (docs/PERFORMANCE.md: 2 raw writers insert ~1.5x what one does); under
    # sustained load 6 drained the queue ~10% faster than 3 (docs/PROFILE.md)
    flush_concurrency: int = 6
    mongo_timeout_ms: int = 5000
    claim_idle_ms: int = 30_000
    dead_letter_after: int = 5
    # GET /accounts/{account}/export: documents per MongoDB read (memory stays this
    # many events, whatever the export's size) and events per answer at most (then
    # it ends with a cursor to go on from)
    export_batch_size: int = 1000
    export_max_events: int = 1_000_000
    # retention
    raw_retention_days: int = 7
    minute_retention_hours: int = 48
    hour_retention_days: int = 90
    # rollups
    rollup_interval_seconds: float = 1.0
    # accounts map to this many rollup partitions (a stable hash), each with its own
    # lease: the rollups processes of every host share them (rollups/lease.py)
    rollup_partitions: int = 1
    # rollovers of an account between two deletions of the documents they superseded
    # (one delete per collection for all of them: rollups/rollover.py, retiring)
    rollup_sweep_every: int = 20
    rollup_timeout_seconds: float = 60.0
    # an idle account's state is let go: its head's copy in Redis lapses this long
    # after its last rollover (readers then read the head from the store), and a
    # rollups process keeps at most this many heads in memory
    head_copy_ttl_seconds: int = 86_400
    rollup_heads_kept: int = 100_000
    summary_cache_seconds: int = 2
    summary_timeout_seconds: float = 10.0
    # per HTTP worker: rollup documents kept in memory once read (they never
    # change); 0 reads every one from the store
    summary_memory_mb: int = 64
    # processes
    watchdog_interval_seconds: float = 1.0
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    # one line per HTTP answer (method, path without its query, status, time, client)
    access_log: bool = False
    # erasure (core/erasure.py, rollups/erasure.py): how long DELETE waits for the
    # job before answering 202 (it goes on in the background), how long a job waits
    # for the entries flushers had read before it to be stored, and for the rollups
    # lease (a rollups pass, a backfill or another erasure)
    erasure_wait_seconds: float = 30.0
    erasure_drain_seconds: float = 120.0
    erasure_lease_seconds: float = 60.0
    # how long a backfill's or erasure's hold on the rollups lease lasts unrenewed: a
    # killed one's is taken over this long after it died
    maintenance_lease_seconds: float = 60.0

    @property
    def metrics_dir(self) -> Path:
        return self.var_dir / "metrics"

    @property
    def instance(self) -> str:
        return self.instance_name or f"{socket.gethostname()}:{self.port}"

    def runs(self, role: str) -> bool:
        return role in self.roles

    @property
    def keys_required(self) -> bool:
        return self.auth == "keys"


ENV_NAMES: dict[str, str] = {f.name: f.name.upper() for f in fields(Settings)}


def parse_api_keys(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    keys: dict[str, tuple[str, frozenset[str]]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, grant = item.partition("=")
        accounts, at, scope = grant.partition("@")
        if not sep or not key or not accounts or (at and scope not in KEY_SCOPES):
            raise SettingsError(
                "API_KEYS must look like 'key1=acc_1|acc_2,key2=acc_3@write,key3=*@admin' "
                f"(scopes: {', '.join(KEY_SCOPES)}; bad entry {item!r})"
            )
        keys[key] = (scope or "read+write", frozenset(a for a in accounts.split("|") if a))
    return keys


def parse_roles(text: str) -> frozenset[str]:
    roles = frozenset(r.strip().lower() for r in text.split(",") if r.strip())
    unknown = roles - ROLES
    if unknown or not roles:
        raise SettingsError(
            f"ROLES must be a comma-separated subset of {', '.join(sorted(ROLES))} (got {text!r})"
        )
    return roles


def _convert(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
    except ValueError:
        kind = type(default).__name__
        raise SettingsError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw


def parse_origins(text: str) -> frozenset[str]:
    if text.strip().lower() == "none":
        return frozenset()
    origins = frozenset(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    bad = [o for o in origins if o != "*" and not _ORIGIN.fullmatch(o)]
    if bad:
        raise SettingsError(
            f"CORS origins must be * or like https://app.example.com[:port] (got {bad[0]!r})"
        )
    return origins


_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?"
)

PARSERS = {
    "api_keys": parse_api_keys,
    "roles": parse_roles,
    "cors_write_origins": parse_origins,
    "cors_read_origins": parse_origins,
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment (``os.environ`` unless given)."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(ENV_NAMES[f.name])
        if raw is None or raw == "":
            continue
        parse = PARSERS.get(f.name)
        if parse:
            values[f.name] = parse(raw)
        else:
            values[f.name] = _convert(ENV_NAMES[f.name], raw, getattr(defaults, f.name))
    settings = Settings(**values)  # type: ignore[arg-type]
    _check(settings)
    if not settings.auth:
        settings = replace(settings, auth=_default_auth(settings))
    return settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_auth(s: Settings) -> str:
    """Keys when any are configured; open only where nobody else can connect."""
    if s.api_keys:
        return "keys"
    if is_loopback(s.host):
        return "open"
    raise SettingsError(
        f"HOST={s.host} listens beyond this machine, and no API key is configured: anyone "
        "who reaches it could read and write every account. Set API_KEYS (a bootstrap key, "
        "e.g. API_KEYS=<secret>=*@admin) or AUTH=keys (keys made with `python -m "
        "scripts.keys create`), or AUTH=open to serve it open anyway."
    )


# a flush of this many one-event entries is acknowledged by one Redis script call
# of ~45 ms (measured here), during which every other Redis client waits
MAX_FLUSH_BATCH_SIZE = 10_000
# every rollups process renews its partitions' leases in one Redis script over them all
MAX_ROLLUP_PARTITIONS = 1024
# an export's read batch is held in memory whole: 10,000 events of up to 8 KiB
MAX_EXPORT_BATCH_SIZE = 10_000

POSITIVE = (
    "port",
    "workers",
    "stream_partitions",
    "max_body_bytes",
    "max_batch_events",
    "queue_max_events",
    "flushers",
    "flush_batch_size",
    "flush_interval_ms",
    "flush_concurrency",
    "mongo_timeout_ms",
    "dead_letter_after",
    "raw_retention_days",
    "rollup_interval_seconds",
    "rollup_timeout_seconds",
    "rollup_partitions",
    "rollup_sweep_every",
    "summary_timeout_seconds",
    "watchdog_interval_seconds",
    "keys_refresh_seconds",
    "maintenance_lease_seconds",
    "head_copy_ttl_seconds",
    "rollup_heads_kept",
    "stream_max_clients",
    "stream_buffer_flushes",
    "export_batch_size",
    "export_max_events",
)


def _check(s: Settings) -> None:
    for name in POSITIVE:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{ENV_NAMES[name]} must be positive")
    if s.flush_batch_size > MAX_FLUSH_BATCH_SIZE:
        raise SettingsError(
            f"FLUSH_BATCH_SIZE must be 1..{MAX_FLUSH_BATCH_SIZE} (got {s.flush_batch_size}): "
            "a flush is one MongoDB write and one Redis script, which blocks Redis while it runs"
        )
    if s.export_batch_size > MAX_EXPORT_BATCH_SIZE:
        raise SettingsError(f"EXPORT_BATCH_SIZE must be 1..{MAX_EXPORT_BATCH_SIZE}")
    if s.rollup_partitions > MAX_ROLLUP_PARTITIONS:
        raise SettingsError(f"ROLLUP_PARTITIONS must be 1..{MAX_ROLLUP_PARTITIONS}")
    if s.port > 65535:
        raise SettingsError("PORT must be at most 65535")
    if s.rate_limit_events_per_second < 0:
        raise SettingsError("RATE_LIMIT_EVENTS_PER_SECOND may not be negative (0 turns it off)")
    for name in ("account_events_per_second", "account_types_per_day", "key_accounts_per_hour"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{ENV_NAMES[name]} may not be negative (0 turns it off)")
    if 0 < s.account_events_per_second < s.max_batch_events:
        raise SettingsError(
            f"ACCOUNT_EVENTS_PER_SECOND={s.account_events_per_second} is below "
            f"MAX_BATCH_EVENTS={s.max_batch_events}: a full batch for one account would be "
            "refused every time. Raise it to at least MAX_BATCH_EVENTS, or lower that."
        )
    if 0 < s.rate_limit_events_per_second < s.max_batch_events:
        # a batch is admitted whole or not at all: one larger than a second's allowance
        # would be a 429 every time, and SDKs retry a 429 for ever
        raise SettingsError(
            f"RATE_LIMIT_EVENTS_PER_SECOND={s.rate_limit_events_per_second} is below "
            f"MAX_BATCH_EVENTS={s.max_batch_events}: a batch of more than "
            f"{s.rate_limit_events_per_second} events would be refused (429) every time it "
            "is retried. Raise the rate limit to at least MAX_BATCH_EVENTS, or lower "
            "MAX_BATCH_EVENTS to at most the rate limit."
        )
    for name in ("shutdown_grace_seconds", "summary_memory_mb", "summary_cache_seconds"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{ENV_NAMES[name]} may not be negative")
    if not 0 <= s.clock_skew_threshold_seconds < float("inf"):
        raise SettingsError("CLOCK_SKEW_THRESHOLD_SECONDS must be a finite number, at least 0")
    # the 24h windows subtract minute buckets a day old, the 30d windows hour
    # buckets 30 days old: both must still be there
    if s.minute_retention_hours < 25:
        raise SettingsError("MINUTE_RETENTION_HOURS must be at least 25 (the 24h window)")
    if s.hour_retention_days < 31:
        raise SettingsError("HOUR_RETENTION_DAYS must be at least 31 (the 30d window)")
    if s.raw_retention_days > s.hour_retention_days:
        raise SettingsError("RAW_RETENTION_DAYS may not exceed HOUR_RETENTION_DAYS")
    if s.auth not in ("", *AUTH_MODES):
        raise SettingsError(f"AUTH must be one of {', '.join(AUTH_MODES)} (got {s.auth!r})")
    if s.auth == "open" and s.api_keys:
        raise SettingsError("AUTH=open and API_KEYS contradict each other: unset one")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    if not 0 <= s.erasure_wait_seconds <= 300:
        raise SettingsError("ERASURE_WAIT_SECONDS must be 0..300")
    for name in ("erasure_drain_seconds", "erasure_lease_seconds"):
        if not 0 < getattr(s, name) < float("inf"):
            raise SettingsError(f"{ENV_NAMES[name]} must be a positive number of seconds")
