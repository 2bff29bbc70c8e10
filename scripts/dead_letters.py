"""Look at, replay and drop dead letters: batches the flusher could not store.

    python -m scripts.dead_letters list [--account acc_1] [--json]
    python -m scripts.dead_letters show 0:1764148500000-0 [--json]
    python -m scripts.dead_letters replay 0:1764148500000-0 [...] [--reason "index fixed"]
    python -m scripts.dead_letters replay --all [--account acc_1] [--reason …]
    python -m scripts.dead_letters drop 0:1764148500000-0 [...] --reason "test data"
    python -m scripts.dead_letters audit [--limit 20] [--json]

A replayed batch goes back into the ingest stream (atomically with leaving
the dead letters) and is stored exactly once, even if part of it was stored
before. A drop is recorded first (who, when, why, how many events) in the
``dead_letter_audit`` collection; so is a replay. Talks to the servers of a
running ``make run`` (same VAR_DIR), or to REDIS_URL / MONGO_URL. Exit codes:
0 done, 2 refused (no such dead letter, bad id, missing reason).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from core import dead_letters, store
from core.connections import connect_redis
from core.dead_letters import DeadLetter, DeadLetterError
from scripts.cli import cli_settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.dead_letters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="every dead letter, oldest first (no events)")
    listing.add_argument("--account", help="only those holding this account's events")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = verbs.add_parser("show", help="one dead letter with its events")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    replay = verbs.add_parser("replay", help="queue them again (stored exactly once)")
    replay.add_argument("ids", nargs="*", metavar="id")
    replay.add_argument("--all", action="store_true", help="every dead letter (of --account)")
    replay.add_argument("--account", help="with --all: only those holding this account's events")
    replay.add_argument("--reason", default="", help="recorded with the replay")
    drop = verbs.add_parser("drop", help="delete them for good (the reason is recorded)")
    drop.add_argument("ids", nargs="+", metavar="id")
    drop.add_argument("--reason", required=True, help="why: recorded with who, when, how many")
    audit = verbs.add_parser("audit", help="the latest replays and drops")
    audit.add_argument("--limit", type=int, default=20)
    audit.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.verb == "replay" and bool(args.ids) == args.all:
        parser.error("replay: give dead letter ids, or --all")
    if args.verb == "replay" and args.account and not args.all:
        parser.error("replay: --account goes with --all")
    return args


def who() -> str:
    return f"cli:uid={os.getuid()}"


def row(letter: DeadLetter) -> str:
    facts = letter.public()
    attempts = facts["attempts"] if facts["attempts"] is not None else "?"
    return "  ".join([
        letter.id, f"{letter.count} events", ",".join(letter.accounts),
        f"attempts {attempts}",
        f"failed {facts['first_failure'] or '?'} .. {facts['last_failure'] or '?'}",
        f"stored before {facts['stored_before'] if letter.stored is not None else '?'}",
        f"reason: {letter.reason}",
    ])  # fmt: skip


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return dead_letters.rfc3339(value)
    return str(value)


async def _all(redis: Any, settings: Any, account: str | None) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    after: str | None = None
    while True:
        limit = dead_letters.MAX_PAGE
        found, after = await dead_letters.page(redis, settings, after=after, limit=limit,
                                               account=account)  # fmt: skip
        out.extend(found)
        if after is None:
            return out


async def run(args: argparse.Namespace) -> int:
    settings = cli_settings()
    client = store.connect(settings)
    redis = connect_redis(settings.redis_url, settings.redis_cluster)
    db = store.database(client, settings)
    refused = 0
    try:
        if args.verb == "list":
            letters = await _all(redis, settings, args.account)
            for letter in letters:
                print(json.dumps(letter.public()) if args.json else row(letter))
            if not args.json:
                print(f"{len(letters)} dead letters", file=sys.stderr)
        elif args.verb == "show":
            letter = await dead_letters.get(redis, settings, args.id)
            shown = letter.shown()
            if args.json:
                print(json.dumps(shown))
            else:
                print(row(letter))
                print(json.dumps(shown["batch"], indent=2) if shown["batch"] is not None
                      else f"body (not JSON): {shown['body']!r}")  # fmt: skip
        elif args.verb in ("replay", "drop"):
            if args.verb == "replay" and args.all:
                ids = [d.id for d in await _all(redis, settings, args.account)]
            else:
                ids = args.ids
            for dead_id in ids:
                try:
                    letter = await dead_letters.get(redis, settings, dead_id)
                    if args.verb == "replay":
                        entry = await dead_letters.replay(db, redis, settings, letter, who(),
                                                          args.reason)  # fmt: skip
                        print(f"replayed {letter.id} ({letter.count} events) as entry {entry}")
                    else:
                        await dead_letters.drop(db, redis, settings, letter, who(), args.reason)
                        print(f"dropped {letter.id} ({letter.count} events)")
                except DeadLetterError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    refused += 1
        else:
            for record in await dead_letters.audit_records(db, args.limit):
                record = {k: _plain(v) if k in ("_id", "at", "first_failure", "last_failure")
                          and v is not None else v for k, v in record.items()}  # fmt: skip
                if args.json:
                    print(json.dumps(record))
                else:
                    print("  ".join(str(record.get(k)) for k in
                                    ("at", "action", "dead_letter", "events", "by", "reason",
                                     "done")))  # fmt: skip
    except DeadLetterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await client.close()
        await redis.aclose()
    return 2 if refused else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
