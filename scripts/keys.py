"""Create, list, revoke and rotate API keys (stored hashed in MongoDB).

    python -m scripts.keys create --scope write --account acc_1 [--label web] [--expires-in 90d]
    python -m scripts.keys list [--account acc_1] [--json]
    python -m scripts.keys revoke KEY_ID
    python -m scripts.keys rotate KEY_ID [--old-valid-for 1d]

The key is printed once, by ``create`` and ``rotate``; only its hash is kept.
A change reaches every HTTP worker of every host within about a second.
Talks to the servers of a running ``make run`` (same VAR_DIR), or to
REDIS_URL / MONGO_URL. Exit codes: 0 done, 2 refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

from core import api_keys, store
from core.api_keys import ApiKey, KeyRequestError
from core.connections import connect_redis
from core.events import now_utc
from scripts.cli import cli_settings

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d{1,9})([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 12h or 30d")
    return timedelta(seconds=int(match[1]) * UNITS[match[2]])


def quota(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in api_keys.QUOTAS or not value.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=NUMBER with NAME one of {', '.join(api_keys.QUOTAS)}"
        )
    return name, int(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--scope", choices=api_keys.SCOPES, required=True,
                        help="write: add events (may sit in a web page); read; admin")  # fmt: skip
    create.add_argument("--account", action="append", required=True, dest="accounts",
                        help="an account the key acts for (repeat; * for all)")  # fmt: skip
    create.add_argument("--label", default="", help="what the key is for")
    create.add_argument("--expires-in", type=duration, help="e.g. 90d (default: never)")
    create.add_argument("--quota", type=quota, action="append", default=[],
                        help="this key's own limit, e.g. events_per_second=5000 (repeat; "
                        f"{', '.join(api_keys.QUOTAS)})")  # fmt: skip
    listing = verbs.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--account", help="only keys that name this account")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    revoke = verbs.add_parser("revoke", help="revoke a key now")
    revoke.add_argument("key_id")
    rotate = verbs.add_parser("rotate", help="a new key; the old one works a while longer")
    rotate.add_argument("key_id")
    rotate.add_argument("--old-valid-for", type=duration, default=timedelta(days=1),
                        help="how long the old key keeps working (default 1d)")  # fmt: skip
    return parser.parse_args(argv)


def row(key: ApiKey, now: datetime) -> str:
    state = "active" if key.active(now) else "inactive"
    facts = key.public()
    return "  ".join([
        key.id, f"{key.scope:<5}", state, ",".join(sorted(key.accounts)),
        f"created {facts['created_at']}",
        f"expires {facts['expires_at'] or 'never'}",
        f"revoked {facts['revoked_at']}" if key.revoked_at else "",
        repr(key.label) if key.label else "",
    ]).rstrip()  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    settings = cli_settings()
    client = store.connect(settings)
    redis = connect_redis(settings.redis_url, settings.redis_cluster)
    db = store.database(client, settings)
    try:
        if args.verb == "create":
            expires = now_utc() + args.expires_in if args.expires_in else None
            key, raw = await api_keys.create(db, redis, settings, args.scope, args.accounts,
                                             args.label, expires, dict(args.quota))  # fmt: skip
            print(raw)
            print(f"created {row(key, now_utc())}", file=sys.stderr)
            print("the key is shown only now: keep it somewhere safe", file=sys.stderr)
        elif args.verb == "list":
            now = now_utc()
            for key in await api_keys.listed(db, args.account):
                facts = key.public() | {"active": key.active(now)}
                print(json.dumps(facts) if args.json else row(key, now))
        elif args.verb == "revoke":
            key = await api_keys.revoke(db, redis, settings, args.key_id)
            print(f"revoked {row(key, now_utc())}")
        else:
            new, raw, old = await api_keys.rotate(db, redis, settings, args.key_id,
                                                  args.old_valid_for)  # fmt: skip
            print(raw)
            print(f"new  {row(new, now_utc())}", file=sys.stderr)
            print(f"old  {row(old, now_utc())}", file=sys.stderr)
            print("the new key is shown only now: keep it somewhere safe", file=sys.stderr)
    except KeyRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await client.close()
        await redis.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
