"""GET /summary/{account_id}: exact figures from one window aggregate plus the live tail.

A summary for window ``w`` and asked at ``to`` (the Redis server's clock) during
minute ``M`` covers ``[window_start(w, M), to)``. It reads, in this order:

1. the account's tail in every partition (events stored, not yet rolled up)
   and the copy of the account's head the rollup job keeps in Redis, in one
   atomic call with TIME, so ``to`` is the moment both were read (the head
   comes from the store instead when there is no copy, or on a retry):
   ``service/snapshot.py``;
2. the one window aggregate the head names, which holds
   ``[window_start(w, S), S)`` for the head's minute ``S``;
3. only if the rollup job has not rolled the account to ``M`` yet (the first
   seconds of a minute, or an idle account): the buckets that left the window
   since ``S``, named by the same head.

Tail events count when they fall in the window and the aggregate does not
hold them: at or after ``S``, or from a tail entry the head had not applied.
Because the head only ever names immutable documents and the tail is trimmed
only after a head that no longer needs those entries is written (and copied),
the figures are exact for every event stored before ``to``, duplicates and
late events included, whatever the rollup job does meanwhile. How the three
combine is ``core/figures.py``.

Each HTTP worker keeps what it read before (``service/caches.py``): its
running count of each account's tail, so it reads only the entries stored
since its last summary (``service/tail_counts.py``), the immutable rollup
documents within ``SUMMARY_MEMORY_MB``, and its answers. Under steady traffic
a 24h summary is one Redis call and no store read at all; uncached, it reads
one aggregate (~50 KB with 5,000 users), however many events the account has.
"""

from __future__ import annotations

import msgspec
from sanic import HTTPResponse, Request

from core.buckets import Counts, Packed, floor, leaving_resolution, window_start
from core.connections import Redis
from core.figures import MAX_TOP, Figures, Reads, combine
from core.rollup_docs import Head, KeptDocuments, Kind, read_packed
from core.settings import Settings
from core.store import Database
from service.auth import require
from service.caches import WorkerMemory, cached_answer, fresh_answer
from service.query import check_account, check_window, query_args, whole_number
from service.snapshot import (
    Raced,
    Snapshot,
    consistently,
    head_moved,
    read_snapshot,
    stores_unavailable,
    with_index,
)
from service.tail_counts import Basis, Running

_encode = msgspec.json.Encoder().encode


class Stale(Exception):
    """The running count of the tail was made under another head or window start."""


async def _packed(
    db: Database, kind: Kind, doc_id: str | None, reads: Reads, docs: KeptDocuments | None
) -> Packed:
    if doc_id is None:
        return Packed.empty()
    found = docs.packed(doc_id) if docs is not None else None
    if found is not None:
        return found
    reads.documents += 1
    found = await read_packed(db, kind, doc_id)
    if found is None:
        raise Raced(doc_id)  # superseded and deleted since the head was read
    if docs is not None:
        docs.keep(doc_id, found)
    return found


async def _left(
    db: Database, head: Head, window: str, minute: int, reads: Reads, docs: KeptDocuments | None
) -> Counts:
    """Buckets that left the window between the head's minute and ``minute``."""
    assert head.minute is not None
    resolution = leaving_resolution(window)
    gone_from, gone_to = window_start(window, head.minute), window_start(window, minute)
    left = Counts()
    for start in sorted(head.buckets(resolution)):
        if gone_from <= start < gone_to:
            doc_id = head.bucket_doc_id(resolution, start)
            bucket = await _packed(db, resolution, doc_id, reads, docs)
            left.merge(bucket.unpack())
    return left


async def figures_at(
    db: Database,
    snapshot: Snapshot,
    account: str,
    window: str,
    memory: WorkerMemory | None = None,
) -> Figures:
    """The figures for the window ending at the snapshot; raises Raced if a rollover got in,
    Stale if the snapshot holds only new entries and they cannot be added to its count."""
    minute = floor(snapshot.to, "minute")
    start = window_start(window, minute)
    figures = Figures(account, window, start, snapshot.to)
    docs = memory.docs if memory is not None else None
    head = await snapshot.know_head(db, account)
    figures.reads.documents += snapshot.head_reads
    if head is not None and head.minute is not None and head.minute > minute:
        raise Raced("the head was rolled past this read's minute")
    basis = Basis.of(head, start)
    previous = snapshot.previous
    if previous is None:
        tail = Running.count(basis, head, snapshot.entries, snapshot.to)
    elif previous.continues(basis, head, snapshot.to):
        tail = previous.advanced(head, snapshot.entries, snapshot.to)
    else:
        raise Stale("the head or the window's start moved since the tail was last counted")
    window_doc = head.windows.get(window) if head else None
    base = await _packed(db, "window", window_doc, figures.reads, docs)
    left = Counts()
    if head is not None and head.minute is not None and head.minute < minute:
        await with_index(db, head, figures.reads, docs)
        left = await _left(db, head, window, minute, figures.reads, docs)
    figures.reads.tail_events = tail.events_read
    combine(figures, base, tail.counts, left)
    if memory is not None:
        memory.tails.keep(account, window, tail)
    return figures


async def compute(
    db: Database,
    redis: Redis,
    settings: Settings,
    account: str,
    window: str,
    top: int,
    memory: WorkerMemory | None = None,
) -> tuple[Figures | bytes, str]:
    """The window's figures (or the cached answer naming ``top`` of them), and its cache key."""

    async def attempt_from(previous: Running | None, attempt: int) -> tuple[Figures | bytes, str]:
        # a read that raced is redone from the store's head: a copy left behind
        # (say the store was restored from a backup) cannot make every try race
        snapshot = await read_snapshot(db, redis, settings, account, previous, attempt == 1)
        key = snapshot.cache_key("summary", account, window, str(top))
        if memory is not None:
            # a worker without a running count would count the whole tail: it asks
            # Redis whether another worker or host answered already
            hit = await memory.answers.get(key, shared=previous is None)
            if hit is not None:
                return hit, key
        return await figures_at(db, snapshot, account, window, memory), key

    async def attempt(n: int) -> tuple[Figures | bytes, str]:
        previous = memory.tails.get(account, window) if memory is not None else None
        try:
            return await attempt_from(previous, n)
        except Stale:
            return await attempt_from(None, n)  # count the whole tail afresh

    (found, key), attempts = await consistently(attempt)
    if isinstance(found, Figures):
        found.reads.attempts = attempts
    return found, key


def parse_request(request: Request, account_id: str | None) -> tuple[str, str, int]:
    args = query_args(request)
    account = check_account(account_id if account_id is not None else args.get("account_id"))
    window = check_window(args.get("window", "24h"))
    return account, window, whole_number(str(args.get("top", "5")), "top", 1, MAX_TOP)


async def get_summary(request: Request, account_id: str | None = None) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    account, window, top = parse_request(request, account_id)
    require(request, settings, [account], "read")
    db, redis = request.app.ctx.db, request.app.ctx.redis
    memory: WorkerMemory = request.app.ctx.read_memory

    async def answer() -> tuple[Figures | bytes, str]:
        return await compute(db, redis, settings, account, window, top, memory)

    with stores_unavailable(settings):
        # identical requests arriving together share one computation
        found, key = await memory.in_flight.run(
            f"summary:{account}:{window}:{top}", answer,
            lambda shared: head_moved(redis, settings, account, shared[1]),
        )  # fmt: skip
    if isinstance(found, bytes):
        return cached_answer(found)
    return await fresh_answer(memory.answers, key, _encode(found.body(top)), found.reads)
