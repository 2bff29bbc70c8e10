"""Recompute rollup buckets over a time range from raw events.

    python -m scripts.backfill_rollups --from 2026-11-20T00:00Z --to 2026-11-21T00:00Z \
        [--account acc_1] [--dry-run]

Idempotent (buckets that already match are left alone) and resumable (it
checkpoints every hour; run the same command again after an interrupt).
Talks to the servers of a running ``make run`` (same VAR_DIR), or to REDIS_URL /
MONGO_URL / MONGO_DB like the service, and runs while the
service runs (it takes the rollups lease meanwhile). Exit codes: 0 done,
2 refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from core import store
from core.connections import connect_redis
from rollups.backfill import Backfill, RangeRefused, Report
from scripts.cli import cli_settings, rfc3339


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.backfill_rollups",
        description="Recompute minute and hour rollup buckets from raw events.",
    )
    parser.add_argument("--from", dest="start", type=rfc3339, required=True)
    parser.add_argument("--to", dest="end", type=rfc3339, required=True)
    parser.add_argument("--account", help="only this account (default: every account)")
    parser.add_argument("--dry-run", action="store_true", help="report what would change")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    settings = cli_settings()
    client = store.connect(settings, settings.rollup_timeout_seconds)
    redis = connect_redis(settings.redis_url)
    started = time.monotonic()
    bar = tqdm(unit="h", desc="backfill", file=sys.stderr, dynamic_ncols=True)

    def progress(report: Report) -> None:
        bar.total = report.hours_total
        bar.n = report.hours_done
        rate = report.events / max(time.monotonic() - started, 1e-6)
        bar.set_postfix(events=report.events, events_per_s=f"{rate:,.0f}",
                        corrected=report.minutes_corrected)  # fmt: skip
        bar.refresh()

    try:
        backfill = Backfill(store.database(client, settings), redis, settings)
        report = await backfill.run(args.start, args.end, account=args.account,
                                    dry_run=args.dry_run, progress=progress)  # fmt: skip
    except RangeRefused as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await client.close()
        await redis.aclose()
    bar.close()
    elapsed = time.monotonic() - started
    verb = "would correct" if args.dry_run else "corrected"
    print(
        f"backfill {'dry run ' if args.dry_run else ''}done: {report.hours_done} hours "
        f"({report.hours_skipped} resumed past), {report.events} events recounted, "
        f"{verb}: {report.minutes_corrected} minutes in {report.accounts_corrected} "
        f"account-hours, in {elapsed:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
