"""The one typed settings object, read from the environment once and passed down.

Every process builds it with :func:`load_settings` at start-up; no other module
reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    # servers; empty means "the stack controller starts its own under var_dir"
    redis_url: str = ""
    mongo_url: str = ""
    var_dir: Path = Path("var")
    mongo_db: str = "events_service"
    stream_key: str = "events:ingest"
    # request limits
    max_body_bytes: int = 1024 * 1024
    max_batch_events: int = 1000
    max_future_seconds: int = 300
    max_metadata_bytes: int = 8 * 1024
    max_metadata_depth: int = 8
    # backpressure: events waiting in the stream (accepted, not yet in MongoDB)
    queue_max_events: int = 1_000_000
    retry_after_seconds: int = 1
    # events per second per API key (or client address when keys are off); 0 = off
    rate_limit_events_per_second: int = 0
    # "key=acc_1|acc_2,key2=*": empty disables authentication
    api_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # flusher
    flush_batch_size: int = 500
    flush_interval_ms: int = 250
    mongo_timeout_ms: int = 5000
    claim_idle_ms: int = 30_000
    dead_letter_after: int = 5
    flusher_consumer: str = "flusher-1"
    # retention
    raw_retention_days: int = 7
    # rollups
    rollup_interval_seconds: float = 5.0
    rollup_safety_lag_seconds: float = 10.0
    rollup_timeout_seconds: float = 300.0
    minute_retention_hours: int = 48
    hour_retention_days: int = 90
    summary_cache_seconds: int = 2
    summary_timeout_seconds: float = 30.0
    # supervision
    watchdog_interval_seconds: float = 1.0
    run_flusher: bool = True
    run_rollups: bool = True
    # the flusher's second copy of each batch into events_recent (see store.py)
    recent_copy: bool = True

    @property
    def dead_letter_key(self) -> str:
        return f"{self.stream_key}:dead"

    @property
    def queue_depth_key(self) -> str:
        return f"{self.stream_key}:depth"

    @property
    def metrics_dir(self) -> Path:
        return self.var_dir / "metrics"

    def api_key_allows(self, key: str | None, account_id: str) -> bool | None:
        """None: unknown key; otherwise whether the key may act for the account."""
        if key is None or key not in self.api_keys:
            return None
        allowed = self.api_keys[key]
        return "*" in allowed or account_id in allowed


ENV_NAMES: dict[str, str] = {f.name: f.name.upper() for f in fields(Settings)}


def parse_api_keys(text: str) -> dict[str, frozenset[str]]:
    keys: dict[str, frozenset[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, accounts = item.partition("=")
        if not sep or not key or not accounts:
            raise SettingsError(
                f"API_KEYS must look like 'key1=acc_1|acc_2,key2=*' (bad entry {item!r})"
            )
        keys[key] = frozenset(a for a in accounts.split("|") if a)
    return keys


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


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment (``os.environ`` unless given)."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(ENV_NAMES[f.name])
        if raw is None or raw == "":
            continue
        if f.name == "api_keys":
            values[f.name] = parse_api_keys(raw)
        else:
            values[f.name] = _convert(ENV_NAMES[f.name], raw, getattr(defaults, f.name))
    settings = Settings(**values)  # type: ignore[arg-type]
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    positive = (
        "port",
        "workers",
        "max_body_bytes",
        "max_batch_events",
        "queue_max_events",
        "flush_batch_size",
        "flush_interval_ms",
        "mongo_timeout_ms",
        "dead_letter_after",
        "raw_retention_days",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{ENV_NAMES[name]} must be positive")
    if s.rollup_safety_lag_seconds * 1000 <= s.mongo_timeout_ms:
        raise SettingsError(
            "ROLLUP_SAFETY_LAG_SECONDS must exceed MONGO_TIMEOUT_MS so a slow "
            "flusher write is never behind the rollup watermark"
        )


def export_metrics_dir(settings: Settings, main_pid: int) -> Path:
    """Point prometheus-client's multiprocess mode at a per-run directory.

    Child processes inherit the variable, so every HTTP worker, the flusher
    and the rollups process write their samples where ``/metrics`` reads them.
    """
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if current:
        return Path(current)
    path = settings.metrics_dir.resolve() / str(main_pid)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path
