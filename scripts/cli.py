"""What the command-line tools share: the settings, pointed at the running servers.

``make run`` starts its own Redis and FerretDB on free ports and records them
under ``VAR_DIR``; a tool run beside it (``python -m scripts.keys …``) finds
them there. ``REDIS_URL`` / ``MONGO_URL``, when set, win.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime

from core.events import is_account_id
from core.settings import Settings, SettingsError, load_settings
from scripts.stack import running_servers

NO_SERVERS = (
    "no servers to talk to: start the service with `make run` (same VAR_DIR), "
    "or set REDIS_URL and MONGO_URL to the service's servers"
)


def cli_settings() -> Settings:
    """The service's settings, with the embedded stack's URLs when they are not set."""
    try:
        settings = load_settings()
        if settings.redis_url and settings.mongo_url:
            return settings
        found = running_servers(settings.var_dir)
        if not found:
            raise SettingsError(NO_SERVERS)
        env = {**os.environ, **{k: v for k, v in found.items() if not os.environ.get(k)}}
        return load_settings(env)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# argument types the command-line tools share


def rfc3339(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone (e.g. a trailing Z)")
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range") from None


def account_id(text: str) -> str:
    if not is_account_id(text):
        raise argparse.ArgumentTypeError("an account id is 1..64 characters of A-Z a-z 0-9 _ . : -")
    return text
