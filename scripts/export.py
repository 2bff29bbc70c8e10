"""Export an account's raw events as NDJSON (the fields POST /events takes).

    python -m scripts.export --account acc_1 --from 2026-11-20T00:00:00Z --to 2026-11-27T00:00:00Z
        [--gzip] [--out FILE] [--resume CURSOR]

Writes one event per line to FILE (or standard output), nothing else, so the
file can be posted again as it is (in batches of at most 1,000 lines). Reads
MongoDB hour by hour in batches of ``EXPORT_BATCH_SIZE`` (constant memory).
At the end it says on standard error how many events it wrote; if it stops
early (the store failed, Ctrl-C) it says which cursor to resume from, and
``--resume CURSOR`` with the same ``--out`` appends the rest (with ``--gzip``
as one more gzip member, which gzip readers take as one file). Talks to the
servers of a running ``make run`` (same VAR_DIR), or to MONGO_URL. Exit codes:
0 complete, 1 stopped early (resume it), 2 refused (bad arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
from collections.abc import Sequence
from typing import IO

from pymongo.errors import PyMongoError

from core import export, store
from core.export import Cursor, ExportError
from scripts.cli import account_id, cli_settings, rfc3339


def cursor(text: str) -> Cursor:
    try:
        return Cursor.parse(text)
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--account", type=account_id, required=True)
    parser.add_argument("--from", dest="start", type=rfc3339, required=True,
                        help="events with a timestamp at or after this (RFC 3339)")  # fmt: skip
    parser.add_argument("--to", dest="end", type=rfc3339, required=True,
                        help="and before this (RFC 3339)")  # fmt: skip
    parser.add_argument("--gzip", action="store_true", help="write gzip")
    parser.add_argument("--out", help="the file to write (default: standard output)")
    parser.add_argument("--resume", type=cursor,
                        help="go on after this cursor (appending to --out)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        export.check_range(args.start, args.end, args.resume)
    except ExportError as exc:
        parser.error(str(exc))
    return args


def output(args: argparse.Namespace) -> tuple[IO[bytes] | gzip.GzipFile, IO[bytes]]:
    """Where lines go, and the file under it (the same unless gzip wraps it)."""
    raw: IO[bytes] = (open(args.out, "ab" if args.resume else "wb") if args.out  # noqa: SIM115
                      else sys.stdout.buffer)  # fmt: skip
    if args.gzip:
        return gzip.GzipFile(fileobj=raw, mode="wb"), raw
    return raw, raw


async def run(args: argparse.Namespace) -> int:
    settings = cli_settings()
    client = store.connect(settings)
    db = store.database(client, settings)
    out, under = output(args)
    written, last = 0, args.resume
    stopped = ""
    try:
        lines = export.events(db, settings, args.account, args.start, args.end, args.resume)
        async for text, position in lines:
            out.write(text)
            written += 1
            last = position
    except PyMongoError as exc:
        stopped = f"the store failed ({type(exc).__name__}: {exc})"
    except (asyncio.CancelledError, KeyboardInterrupt):
        stopped = "interrupted"
    finally:
        out.close()  # a gzip member ends here, so what was written can be read
        if under is not out and args.out:
            under.close()
        elif under is sys.stdout.buffer:
            under.flush()
        await client.close()
    if stopped:
        resume = f"--resume {last}" if last else "the same command (nothing was written)"
        print(f"stopped after {written} events, {stopped}: go on with {resume}", file=sys.stderr)
        return 1
    print(f"exported {written} events of {args.account} (complete)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
