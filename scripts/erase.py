"""Erase a user of an account, a time range of an account, or a whole account: the raw
events and every figure derived from them (``rollups/erasure.py``).

    python -m scripts.erase user --account acc_1 --user user_10
    python -m scripts.erase range --account acc_1 --from 2026-11-26T09:00Z --to 2026-11-26T10:00Z
    python -m scripts.erase account --account acc_1 --yes
    python -m scripts.erase status [--account acc_1] [--json]     # jobs, newest first
    python -m scripts.erase audit [--account acc_1] [--json]      # one record per run

It runs beside the service (it asks the rollups process for its lease), shows
where it is on standard error, and ends with what it erased. The same command
again resumes an erasure that stopped (Ctrl-C, a crash, a failure it explains),
or, after one that finished, erases what came since (usually nothing). Talks to
the servers of a running ``make run`` (same VAR_DIR), or to REDIS_URL /
MONGO_URL. Exit codes: 0 done, 1 stopped (run it again to resume), 2 refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo.errors import PyMongoError

from core import erasure, store
from core.connections import REDIS_ERRORS, connect_redis
from core.erasure import ErasureError, ErasureRefused, Job, Scope
from rollups.erasure import Eraser
from scripts.cli import account_id, cli_settings, rfc3339

PROGRESS_EVERY = 0.5  # seconds between progress lines (each step change is shown at once)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.erase",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    user = verbs.add_parser("user", help="a user's events, whenever they happened")
    user.add_argument("--account", type=account_id, required=True)
    user.add_argument("--user", required=True, help="the user id, as the events carry it")
    span = verbs.add_parser("range", help="an account's events with a timestamp in [from, to)")
    span.add_argument("--account", type=account_id, required=True)
    span.add_argument("--from", dest="start", type=rfc3339, required=True)
    span.add_argument("--to", dest="end", type=rfc3339, required=True)
    whole = verbs.add_parser("account", help="everything of an account")
    whole.add_argument("--account", type=account_id, required=True)
    whole.add_argument("--yes", action="store_true", help="required: there is no undo")
    for name, what in (("status", "erasure jobs, newest first"), ("audit", "one record per run")):
        listing = verbs.add_parser(name, help=what)
        listing.add_argument("--account", type=account_id)
        listing.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser.parse_args(argv)


def who() -> str:
    return f"cli:uid={os.getuid()}"


class ProgressLine:
    """Where the erasure is, on standard error: a line per step and every half second."""

    def __init__(self) -> None:
        self.step = ""
        self.shown = 0.0

    def __call__(self, job: Job) -> None:
        now = time.monotonic()
        if job.step == self.step and now - self.shown < PROGRESS_EVERY:
            return
        self.step, self.shown = job.step, now
        hours = f" hour {job.hours_done}/{job.hours_total}" if job.hours_total else ""
        print(f"erasure {job.id} run {job.run}: {job.step}{hours}, {job.events} stored events "
              f"deleted, {job.rollup_events} out of the rollups, {job.tail_events} out of the "
              "live tail", file=sys.stderr, flush=True)  # fmt: skip


def scope_of(args: argparse.Namespace) -> Scope:
    if args.verb == "user":
        return Scope.of_user(args.account, args.user)
    if args.verb == "range":
        return Scope.of_range(args.account, args.start, args.end)
    if not args.yes:
        raise ErasureRefused(f"erasing the whole account {args.account} cannot be undone: "
                             "add --yes")  # fmt: skip
    return Scope.of_account(args.account)


def summary(job: Job, seconds: float, dropped: int) -> str:
    what = {"user": f"user {job.scope.get('user_hash', '')[:12]}… (hash) of",
            "range": f"{job.scope.get('from')}..{job.scope.get('to')} of",
            "account": "the whole account"}[job.scope["kind"]]  # fmt: skip
    return (
        f"erasure done: {what} {job.account}: {job.events} stored events deleted, "
        f"{job.rollup_events} taken out of the rollups, {job.tail_events} out of the live tail, "
        f"{job.dead_letter_events} out of dead letters, {dropped} queued ones kept out so far, "
        f"in {seconds:.1f}s (job {job.id}, run {job.run})"
    )


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


async def run(args: argparse.Namespace) -> int:
    settings = cli_settings()
    client = store.connect(settings, settings.rollup_timeout_seconds)
    redis = connect_redis(settings.redis_url, settings.redis_cluster)
    db = store.database(client, settings)
    try:
        if args.verb in ("status", "audit"):
            if args.verb == "status":
                rows = [job.public() for job in await erasure.jobs(db, args.account)]
            else:
                rows = await erasure.audit_records(db, args.account)
            for row in rows:
                print(json.dumps(row, default=_plain) if args.json else _row(row))
            return 0
        scope = scope_of(args)
        started = time.monotonic()
        job = await Eraser(db, redis, settings, who(), ProgressLine()).erase(scope)
        dropped = await erasure.dropped_so_far(db, redis, settings, job.run_id)
        print(summary(job, time.monotonic() - started, dropped))
        return 0
    except ErasureRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ErasureError, PyMongoError, *REDIS_ERRORS) as exc:
        print(f"stopped: {exc}\nrun the same command again to resume", file=sys.stderr)
        return 1
    finally:
        await client.close()
        await redis.aclose()


def _row(row: dict[str, Any]) -> str:
    facts = [str(row.get("id") or row.get("_id")), str(row.get("kind")), str(row.get("account"))]
    if row.get("user_hash"):
        facts.append(f"user {str(row['user_hash'])[:12]}…")
    if row.get("from"):
        facts.append(f"{_plain(row['from'])}..{_plain(row.get('to'))}")
    for name in ("state", "step", "done", "events", "by", "requested_at", "finished_at",
                 "error"):  # fmt: skip
        if row.get(name) not in (None, ""):
            facts.append(f"{name} {_plain(row[name]) if name.endswith('_at') else row[name]}")
    return "  ".join(facts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
