"""A pass over many accounts at once: what a rollover costs, shared by a batch.

Rolling accounts one by one costs several store round trips each (a draft
record, an insert per kind of document, the head, the deletes) and a Redis call
per step; at thousands of accounts a minute those round trips are the pass. Here
``BATCH`` accounts go together (``Roller.publish``):

1. their heads (kept in memory; the others read a few at once), and before the
   first batch, the buckets that leave a window at this minute for many accounts
   at once (one query per bucket start, not one per account: ``prefetch``);
2. their tails, in pipelined Redis calls;
3. each account's new documents and head, prepared in memory (an account with
   nothing to do writes nothing: its schedule is only checked);
4. one draft record, one ``insert_many`` per kind of document, one of the new
   heads (compare-and-set, unordered: the duplicate-key errors name the accounts
   that raced); the losers' documents are discarded and those accounts prepared
   again from the head that won, once;
5. in pipelined Redis calls, the head copies, then the tail trims and the
   accounts' schedules.

Every invariant of a single rollover holds account by account: a head is
published only by compare-and-set over the one it was prepared from; no head
names a document that is not written, and no document outlives a head that lost;
an account's failure fails only that account.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from bson.errors import InvalidDocument
from pymongo.errors import PyMongoError

from core import keys, metrics
from core.buckets import (
    WINDOWS,
    Packed,
    Resolution,
    leaving_resolution,
    to_datetime,
    window_start,
)
from core.rollup_docs import COLLECTIONS, PROJECTION, Head
from core.tail import TailEntry
from rollups.rollover import TRIM_MANY, Draft, Roller, applied_by, next_change, starts_between
from rollups.sweep import RETIRE_AFTER_MS, retire_due

log = logging.getLogger(__name__)

BATCH = 500  # accounts written together
# batches in flight: one is prepared (Python) while another's writes are in the store
BATCHES_AT_ONCE = 2
PREPARING_AT_ONCE = 32  # accounts prepared at once (they wait on the store only on a miss)
PREFETCH_FROM = 16  # accounts needing one bucket start: read by its start, not one by one

# what fails one account, not the pass: a store error on its documents, a document past
# MongoDB's 16 MiB (docs/OPERATIONS.md, the limits of one account), a missing document
ACCOUNT_ERRORS = (PyMongoError, InvalidDocument, LookupError, ValueError)


@dataclass
class Outcome:
    """What a pass over some accounts did."""

    rolled: int = 0
    failed: int = 0
    untouched: int = 0  # due, but nothing to do
    fenced: bool = False  # a newer holder of the partition wrote: stop
    stopped: bool = False  # told to stop before every account was done
    documents: dict[str, int] = field(default_factory=dict)


async def roll_accounts(
    roller: Roller,
    accounts: Sequence[str],
    minute: int,
    keep_going: Callable[[], bool] = lambda: True,
) -> Outcome:
    """Roll these accounts to ``minute``, ``BATCH`` at a time; stop between batches once
    ``keep_going`` says so (a partition lost, or wanted by a backfill)."""
    out = Outcome()
    heads = await roller.heads_of(accounts)
    batches = [accounts[i : i + BATCH] for i in range(0, len(accounts), BATCH)]
    gate = asyncio.Semaphore(BATCHES_AT_ONCE)

    async def one(some: Sequence[str]) -> None:
        async with gate:
            if out.fenced or not keep_going():
                out.stopped = not out.fenced
                out.failed += len(some)
                return
            await _batch(roller, some, {a: heads[a] for a in some}, minute, out, retry=True)

    ahead: set[str] = set()  # this call's read-ahead (partitions are rolled at once)
    try:
        await prefetch(roller, heads.values(), minute, ahead)
        await asyncio.gather(*(one(b) for b in batches))
    finally:
        for doc_id in ahead:
            roller.prefetched.pop(doc_id, None)
        await roller.swept()
    return out


async def _batch(roller: Roller, accounts: Sequence[str], heads: dict[str, Head], minute: int,
                 out: Outcome, retry: bool) -> None:  # fmt: skip
    tails = await roller.read_tail_of(accounts)
    gate = asyncio.Semaphore(PREPARING_AT_ONCE)

    async def prepare(account: str) -> Draft | None:
        async with gate:
            return await roller.prepare(heads[account], tails[account], minute)

    prepared = await asyncio.gather(*(prepare(a) for a in accounts), return_exceptions=True)
    drafts: list[Draft] = []
    untouched: list[Head] = []
    for account, result in zip(accounts, prepared, strict=True):
        if isinstance(result, ACCOUNT_ERRORS):
            _failed(out, account, result)
        elif isinstance(result, BaseException):
            raise result
        elif result is None:
            untouched.append(heads[account])
        else:
            drafts.append(result)
    published = await roller.publish(drafts)
    out.untouched += len(untouched)
    out.rolled += len(published.won)
    for draft in published.won:
        for kind, written in draft.docs.items():
            out.documents[kind] = out.documents.get(kind, 0) + len(written)
    await _after(roller, published.won, [(h, tails[h.account_id]) for h in untouched])
    for draft, error in published.failed:
        _failed(out, draft.new.account_id, error)
    if published.fenced:
        out.fenced = True
        out.failed += len(published.fenced)
        metrics.ROLLUP_ACCOUNT_FAILURES.labels("fenced").inc(len(published.fenced))
        log.warning("account %s was rolled under a newer lease of its partition: this "
                    "process no longer holds it", published.fenced[0].new.account_id)  # fmt: skip
    raced = [d.new.account_id for d in published.raced]
    if raced and retry:  # from the heads that won, once
        again = await roller.heads_of(raced)
        await _batch(roller, raced, again, minute, out, retry=False)
    elif raced:
        out.failed += len(raced)
        metrics.ROLLUP_ACCOUNT_FAILURES.labels("conflict").inc(len(raced))
        log.info("%d accounts were rolled by another job twice in a row (%s, ...); retried "
                 "next run", len(raced), raced[0])  # fmt: skip


def _failed(out: Outcome, account: str, error: BaseException) -> None:
    out.failed += 1
    metrics.ROLLUP_ACCOUNT_FAILURES.labels(type(error).__name__).inc()
    # its tail keeps its events: its figures stay exact, and the next pass tries again
    log.warning("rolling account %s failed: %s", account, error)


async def _after(roller: Roller, won: Sequence[Draft],
                 untouched: Sequence[tuple[Head, list[TailEntry]]]) -> None:  # fmt: skip
    """The tail trims (the new heads' copies are in Redis already) and the schedules, in
    one pipelined call: a script call per stream partition for the trims, a ``ZADD``
    (and ``ZREM``) per rollup partition for the schedules. An untouched account's tail
    is trimmed too: its head may have been published by a process that died before
    trimming (a partition taken over), and its entries wait for no other rollover; that
    process may have died before copying the head too, so older copies are raised
    first (a reader of the copy before needs the entries)."""
    settings = roller.settings
    await roller.redis.script_load(TRIM_MANY)
    retire_at = time.time() * 1000 + RETIRE_AFTER_MS
    due: dict[str, dict[str, float]] = {}  # schedule -> account -> minute
    done: dict[str, list[str]] = {}  # schedule -> accounts with nothing ahead
    retire: dict[str, dict[str, float]] = {}  # retire schedule -> account -> when
    for head in [d.new for d in won] + [h for h, _ in untouched]:
        partition = roller.partition_of(head.account_id)
        change = next_change(head)
        key = keys.rollup_schedule(settings, partition)
        if change is None:
            done.setdefault(key, []).append(head.account_id)
        else:
            due.setdefault(key, {})[head.account_id] = change
    for draft in won:
        if retire_due(draft.new):
            key = keys.rollup_retire(settings, roller.partition_of(draft.new.account_id))
            retire.setdefault(key, {})[draft.new.account_id] = retire_at
    # the copies first: a reader of an older copy needs the entries these heads applied
    await roller.raise_copies([h for h, entries in untouched
                               if h.minute is not None and applied_by(h, entries)])  # fmt: skip
    calls = roller.many_trims_calls([(d.new, d.entries) for d in won] + list(untouched))
    calls += [("zadd", (key, members)) for key, members in (*due.items(), *retire.items())]
    calls += [("zrem", (key, *accounts)) for key, accounts in done.items()]
    async with roller.redis.pipeline(transaction=False) as pipe:
        for method, args in calls:
            getattr(pipe, method)(*args)
        await pipe.execute()


async def prefetch(roller: Roller, heads: Collection[Head], minute: int,
                   ahead: set[str] | None = None) -> int:  # fmt: skip
    """Read the buckets leaving a window at ``minute`` that many of these accounts need
    and the roller does not keep: one query per bucket start and rollup partition
    (equality on both, one index), instead of one read per account. How many were read;
    the rest (buckets written under another ``ROLLUP_PARTITIONS``) are read by their
    start alone if many are left, else by the rollover that needs them. The ids read
    are added to ``ahead``, for the caller to drop from ``roller.prefetched``."""
    ahead = set() if ahead is None else ahead
    wanted: dict[tuple[Resolution, int, str], set[str]] = {}
    for head in heads:
        if head.minute is None or head.minute >= minute:
            continue
        lane = roller.lane(head.account_id)
        for window in WINDOWS:
            resolution = leaving_resolution(window)
            gone_from, gone_to = window_start(window, head.minute), window_start(window, minute)
            for start in starts_between(head.buckets(resolution), gone_from, gone_to, resolution):
                doc_id = head.bucket_doc_id(resolution, start)
                if doc_id is not None and roller.cache.get(doc_id) is None:
                    wanted.setdefault((resolution, start, lane), set()).add(doc_id)
    found = 0
    by_start: dict[tuple[Resolution, int], set[str]] = {}
    for (resolution, start, lane), ids in wanted.items():
        if len(ids) >= PREFETCH_FROM:
            query = {"start": to_datetime(start), "rollup_partition": lane}
            found += await _read_ahead(roller, resolution, query, ids, ahead)
        by_start.setdefault((resolution, start), set()).update(ids - roller.prefetched.keys())
    for (resolution, start), ids in by_start.items():
        if len(ids) >= PREFETCH_FROM:
            query = {"start": to_datetime(start)}
            found += await _read_ahead(roller, resolution, query, ids, ahead)
    return found


async def _read_ahead(roller: Roller, resolution: Resolution, query: dict[str, object],
                      ids: set[str], ahead: set[str]) -> int:  # fmt: skip
    found = 0
    async for doc in roller.db[COLLECTIONS[resolution]].find(query, {"_id": 1, **PROJECTION}):
        if doc["_id"] in ids:
            roller.prefetched[doc["_id"]] = Packed.of(doc).unpack()
            ahead.add(doc["_id"])
            found += 1
    return found
