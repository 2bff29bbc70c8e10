"""GET /summary/{account_id}: exact figures from one window aggregate plus the live tail.

A summary for window ``w`` asked at ``to`` (the Redis server's clock) during
minute ``M`` covers ``[window_start(w, M), to)``. It reads, in this order:

1. the account's tail in every partition (events stored, not yet rolled up)
   and the copy of the account's head the rollup job keeps in Redis, in one
   atomic call with TIME, so ``to`` is the moment both were read (the head
   comes from the store instead when there is no copy, or on a retry);
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
late events included, whatever the rollup job does meanwhile.

Each HTTP worker keeps what it read before (``WorkerMemory``): its running
count of each account's tail, so it reads only the entries stored since its
last summary (``service/live_tail.py``), and the immutable rollup documents
within ``SUMMARY_MEMORY_MB``. Under steady traffic a 24h summary is one Redis
call and no store read at all; uncached, it reads one aggregate (~50 KB with
5,000 users), however many events the account has.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import msgspec
from pymongo.errors import PyMongoError
from sanic import HTTPResponse, Request

from core import keys
from core.buckets import (
    WINDOWS,
    Counts,
    Packed,
    floor,
    leaving_resolution,
    to_datetime,
    top_users,
    window_start,
)
from core.connections import REDIS_ERRORS, Redis
from core.events import is_account_id
from core.metrics import Live
from core.rollup_docs import Head, KeptDocuments, load_index, read_head, read_packed
from core.settings import Settings
from core.store import Database
from core.tail import TailEntry, last_ids, read_tails, redis_time_ms
from service.auth import require
from service.errors import BadRequest, Unavailable, client_input
from service.live_tail import Basis, Running, RunningTails

T = TypeVar("T")

MAX_TOP = 100
KEPT_ANSWERS = 10_000  # per worker
ATTEMPTS = 20  # a read that raced a rollover is simply redone
_encode = msgspec.json.Encoder().encode


class Raced(Exception):
    """A rollover replaced what this read was looking at; read again."""


class Stale(Exception):
    """The running count of the tail was made under another head or window start."""


@dataclass
class Reads:
    documents: int = 0
    tail_events: int = 0
    attempts: int = 1


@dataclass
class Figures:
    """A window's exact figures, with users unpacked only as far as needed."""

    account_id: str
    window: str
    start: int
    to: int
    total: int = 0
    types: dict[str, int] = field(default_factory=dict)
    unique_users: int = 0
    top: list[tuple[str, int]] = field(default_factory=list)
    reads: Reads = field(default_factory=Reads)

    def body(self, top: int) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "window": self.window,
            "from": iso(self.start),
            "to": iso(self.to),
            "total": self.total,
            "totals": dict(sorted(self.types.items())),
            "unique_users": self.unique_users,
            "top_users": [{"user_id": u, "events": n} for u, n in self.top[:top]],
            "as_of": iso(self.to),
        }


def iso(epoch_ms: int) -> str:
    return to_datetime(epoch_ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _packed(
    db: Database, kind: Any, doc_id: str | None, reads: Reads, docs: KeptDocuments | None
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


async def _with_index(db: Database, head: Head, reads: Reads, docs: KeptDocuments | None) -> None:
    """Fill in the head's bucket lists, from memory when this worker read them before."""
    if head.index is not None and (docs is None or docs.index(head.index) is None):
        reads.documents += 1
    if not await load_index(db, head, docs):
        raise Raced("the head's bucket index was superseded")


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


def combine(figures: Figures, base: Packed, extra: Counts, left: Counts) -> None:
    """The aggregate, minus the buckets that left, plus the tail."""
    figures.total = base.total - left.total + extra.total
    types = dict(base.types)
    for t, n in left.types.items():
        types[t] -= n
    for t, n in extra.types.items():
        types[t] = types.get(t, 0) + n
    figures.types = {t: n for t, n in types.items() if n}
    if not extra.users and not left.users:
        figures.unique_users, figures.top = base.unique_users, base.top
        return
    # only the users the tail or the left buckets touch change: look them up in
    # the aggregate's user counts (built once per kept document) and rank them
    # with its top 100 instead of ranking every user
    index = base.index()
    candidates = dict(base.top)
    unique = base.unique_users
    for user in set(extra.users) | set(left.users):
        before = index.get(user, 0)
        after = before - left.users.get(user, 0) + extra.users.get(user, 0)
        unique += (after > 0) - (before > 0)
        if after:
            candidates[user] = after
        else:
            candidates.pop(user, None)
    figures.unique_users = unique
    if base.unique_users > len(base.top) and _top_may_be_elsewhere(base, candidates):
        users = dict(index)
        for user, n in candidates.items():
            users[user] = n
        for user in left.users:
            if user not in candidates:
                users.pop(user, None)
        candidates = users
    figures.top = top_users(candidates, MAX_TOP)


def _top_may_be_elsewhere(base: Packed, candidates: dict[str, int]) -> bool:
    """Whether a user outside the candidates could now be among the top 100.

    Every other user ranks behind the aggregate's 100th; while at least 100
    candidates still rank at or ahead of it, none of them can get in.
    """
    last_user, last_n = base.top[-1]
    ahead = sum(1 for u, n in candidates.items() if (-n, u) <= (-last_n, last_user))
    return ahead < MAX_TOP


@dataclass
class Snapshot:
    """The tail as read at ``to`` (all of it, or only what came after ``previous``'s
    entries), maybe the head read with it, and the cache key of the figures it leads to."""

    to: int
    entries: list[TailEntry]
    cache_key: str
    previous: Running | None = None
    head: Head | None = None  # the head's copy read with the tail; None: read the store


class Answers:
    """Encoded answers by cache key (which includes ``top``), each kept for
    ``SUMMARY_CACHE_SECONDS``, in one worker's memory (least recently kept go).

    A key names the minute and the tail's newest entries, so while no event is
    stored a repeated question is answered without reading anything more. The
    same answers go to Redis for the workers that hold no running count of the
    account yet (another host, a restarted worker): only those ask Redis, as the
    others count just the few entries stored since their last summary.
    """

    def __init__(self, seconds: float, limit: int = KEPT_ANSWERS) -> None:
        self._seconds, self._limit = seconds, limit
        self._kept: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        found = self._kept.get(key)
        if found is None or found[0] <= time.monotonic():
            return None
        return found[1]

    def keep(self, key: str, body: bytes) -> None:
        if self._seconds <= 0:
            return
        now = time.monotonic()
        self._kept[key] = (now + self._seconds, body)
        self._kept.move_to_end(key)
        # every answer lives as long: the oldest kept expire first
        while self._kept and (len(self._kept) > self._limit or self._oldest_expiry() <= now):
            self._kept.popitem(last=False)

    def _oldest_expiry(self) -> float:
        return next(iter(self._kept.values()))[0]


@dataclass
class WorkerMemory:
    """What one HTTP worker keeps between summaries (see ``service/live_tail.py``)."""

    tails: RunningTails
    docs: KeptDocuments | None  # None: every rollup document is read from the store
    answers: Answers
    in_flight: SingleFlight

    @classmethod
    def for_settings(cls, settings: Settings) -> WorkerMemory:
        budget = settings.summary_memory_mb * 2**20
        docs = KeptDocuments(budget) if budget else None
        return cls(RunningTails(), docs, Answers(settings.summary_cache_seconds), SingleFlight())


async def read_tail(
    redis: Redis,
    settings: Settings,
    account: str,
    window: str,
    previous: Running | None = None,
    with_head: bool = False,
) -> Snapshot:
    """The tail (after ``previous``'s entries) and, ``with_head``, the head's Redis copy."""
    after = previous.last if previous is not None else None
    head_key = keys.head_copy(settings, account) if with_head else None
    read = await read_tails(redis, keys.partitions(settings), account, after, head_key)
    # the same minute and the same tail give the same figures, whatever the
    # rollups did meanwhile: a new stored event always changes the key
    newest = last_ids(read.entries, after)
    tails = ",".join(f"{p}:{i[0]}-{i[1]}" for p, i in sorted(newest.items()))
    key = f"{account}:{window}:{floor(read.to, 'minute')}:{tails or '-'}"
    head = Head.from_copy(read.head) if read.head is not None else None
    return Snapshot(read.to, read.entries, key, previous, head)


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
    head = snapshot.head
    if head is None:
        figures.reads.documents += 1
        head = await read_head(db, account)
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
        await _with_index(db, head, figures.reads, docs)
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
    cached: Callable[[str, bool], Awaitable[bytes | None]] | None = None,
    memory: WorkerMemory | None = None,
) -> tuple[Figures | bytes, str]:
    """The window's figures (or a cached answer for them), and their cache key."""

    tries = 0

    async def attempt_from(previous: Running | None) -> tuple[Figures | bytes, str]:
        # a read that raced is redone from the store's head: a copy left behind
        # (say the store was restored from a backup) cannot make every try race
        with_head = tries == 1
        snapshot = await read_tail(redis, settings, account, window, previous, with_head)
        cold = previous is None  # no running count here: the whole tail would be counted
        if cached is not None and (hit := await cached(snapshot.cache_key, cold)) is not None:
            return hit, snapshot.cache_key
        return await figures_at(db, snapshot, account, window, memory), snapshot.cache_key

    async def attempt() -> tuple[Figures | bytes, str]:
        nonlocal tries
        tries += 1
        previous = memory.tails.get(account, window) if memory is not None else None
        try:
            return await attempt_from(previous)
        except Stale:
            return await attempt_from(None)  # count the whole tail afresh

    (found, key), attempts = await consistently(attempt)
    if isinstance(found, Figures):
        found.reads.attempts = attempts
    return found, key


async def consistently(read: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """What ``read()`` returns, and on which attempt: a read that raced a rollover is redone."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await read(), attempt
        except Raced:
            await asyncio.sleep(0.005 * attempt)
    raise Unavailable("the rollups kept changing under this read; retry", 1)


@contextmanager
def stores_unavailable(settings: Settings) -> Iterator[None]:
    """MongoDB or Redis unreachable while reading: a 503 with Retry-After, not a 500."""
    try:
        yield
    except PyMongoError as exc:
        retry = settings.retry_after_seconds
        raise Unavailable("MongoDB is unreachable; retry later", retry) from exc
    except REDIS_ERRORS as exc:
        raise Unavailable(
            "Redis is unreachable; retry later", settings.retry_after_seconds
        ) from exc


def check_account(account: str | None) -> str:
    if not account or not is_account_id(account):
        raise BadRequest("account_id must be 1..64 characters of A-Z a-z 0-9 _ . : -",
                         field="account_id")  # fmt: skip
    return account


def check_window(window: str | None) -> str:
    if window is None or window not in WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(WINDOWS)}", field="window")
    return window


def parse_request(request: Request, account_id: str | None) -> tuple[str, str, int]:
    with client_input("the query string"):
        args = request.get_args(keep_blank_values=True)  # "window=" is a mistake
        account = account_id if account_id is not None else args.get("account_id")
        window = args.get("window", "24h")
        top_text = str(args.get("top", "5"))
    account, window = check_account(account), check_window(window)
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
    if not (top_text.isascii() and top_text.isdigit()) or not 1 <= int(top_text) <= MAX_TOP:
        raise BadRequest(f"top must be a whole number from 1 to {MAX_TOP}", field="top")
    return account, window, int(top_text)


async def get_summary(request: Request, account_id: str | None = None) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    account, window, top = parse_request(request, account_id)
    require(request, settings, [account], "read")
    db, redis = request.app.ctx.db, request.app.ctx.redis
    memory: WorkerMemory = request.app.ctx.summary_memory

    def answer_key(key: str) -> str:
        return f"{key}:{top}"

    async def cached(key: str, cold: bool) -> bytes | None:
        found = memory.answers.get(answer_key(key))
        if found is None and cold:  # another worker or host may have answered it
            found = await _cache_get(redis, settings, answer_key(key))
        return found

    async def answer() -> tuple[Figures | bytes, str]:
        return await compute(db, redis, settings, account, window, cached, memory)

    with stores_unavailable(settings):
        # identical requests arriving together share one computation
        found, key = await memory.in_flight.run(f"{account}:{window}:{top}", answer)
    if isinstance(found, bytes):
        return HTTPResponse(found, content_type="application/json", headers={"X-Cache": "hit"})
    encoded = _encode(found.body(top))
    memory.answers.keep(answer_key(key), encoded)
    await _cache_set(redis, settings, answer_key(key), encoded)
    headers = {
        "X-Cache": "miss",
        "X-Documents-Read": str(found.reads.documents),
        "X-Tail-Events-Read": str(found.reads.tail_events),
    }
    return HTTPResponse(encoded, content_type="application/json", headers=headers)


class SingleFlight:
    """Identical computations asked for concurrently in one worker share one run."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        while (running := self._running.get(key)) is not None:
            try:
                return cast(T, await asyncio.shield(running))
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request itself was cancelled
                # the leader went away mid-way: take over (or join the next one)
        shared: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._running[key] = shared
        try:
            result = await compute()
        except Exception as exc:
            shared.set_exception(exc)
            shared.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        except BaseException:
            shared.cancel()  # the leader was cancelled; joiners see that and may retry
            raise
        else:
            shared.set_result(result)
            return result
        finally:
            del self._running[key]


async def _cache_get(redis: Redis, settings: Settings, key: str) -> bytes | None:
    if settings.summary_cache_seconds <= 0:
        return None
    try:
        value = await redis.get(keys.summary_cache(settings, key))
    except REDIS_ERRORS:
        return None  # the cache is an optimisation
    return value if isinstance(value, bytes) else None


async def _cache_set(redis: Redis, settings: Settings, key: str, value: bytes) -> None:
    if settings.summary_cache_seconds <= 0:
        return
    try:
        await redis.set(keys.summary_cache(settings, key), value, ex=settings.summary_cache_seconds)
    except REDIS_ERRORS:
        return


async def rollup_figures(request: Request) -> dict[str, Live]:
    settings: Settings = request.app.ctx.settings
    redis = request.app.ctx.redis
    try:  # not pipelined: a cluster pipeline refuses TIME
        now_reply = await redis.time()
        minute = await redis.get(keys.rollup_progress(settings))
    except REDIS_ERRORS:
        return {}
    if minute is None:
        return {}
    lag = (redis_time_ms(now_reply) - int(minute)) / 1000
    return {
        "rollup_lag_seconds": Live(
            "Seconds since the minute the last complete rollover pass rolled to "
            "(healthy: below 60 + ROLLUP_INTERVAL_SECONDS)",
            lag,
        )
    }
