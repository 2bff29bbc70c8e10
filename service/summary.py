"""GET /summary/{account_id}: exact figures from at most 1440 buckets plus a live tail.

For a window ending at ``to``:

- full hours (windows over 24h) come from hour buckets, full minutes from
  minute buckets;
- the partial current minute [floor(to), to) is read raw;
- the live tail adds raw events of the bucketed range that arrived after the
  bucket covering them was computed (``ingested_at > max(W, bucket.w)``, where
  W is the rollup watermark read before the buckets).

A bucket is exact for events ingested up to its own ``w`` and, because every
run recomputes whatever received events, also up to W; so the tail counts
each stored event exactly once whatever the rollup job does meanwhile.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import msgspec
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from sanic import HTTPResponse, Request

from rollups import store as rollup_store
from rollups.buckets import WINDOWS, Counts, Document, Resolution, floor, plan_window, top_users
from service import store
from service.config import Settings
from service.ingest import api_key_of
from service.metrics import Live
from service.responses import error_response

T = TypeVar("T")

ACCOUNT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$(?!\n)")
MAX_TOP = 100
_encode = msgspec.json.Encoder().encode


@dataclass
class Reads:
    buckets: int = 0
    raw_events: int = 0


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_request(request: Request, account_id: str | None) -> tuple[str, str, int] | HTTPResponse:
    args = request.get_args(keep_blank_values=True)  # "window=" is a mistake, not a default
    account = account_id if account_id is not None else args.get("account_id")
    if not account or not ACCOUNT.match(account):
        return error_response(
            400, "bad_request", "account_id must be 1..64 characters of A-Z a-z 0-9 _ . : -"
        )
    window = args.get("window", "24h")
    if window not in WINDOWS:
        return error_response(
            400, "bad_request", f"window must be one of {', '.join(WINDOWS)}", field="window"
        )
    top_text = str(args.get("top", "5"))
    if not top_text.isdigit() or not 1 <= int(top_text) <= MAX_TOP:
        return error_response(
            400, "bad_request", f"top must be a whole number from 1 to {MAX_TOP}", field="top"
        )
    return account, window, int(top_text)


def check_key(request: Request, settings: Settings, account: str) -> HTTPResponse | None:
    if not settings.api_keys:
        return None
    allowed = settings.api_key_allows(api_key_of(request), account)
    if allowed is None:
        return error_response(
            401, "unauthorized", "send a valid API key in X-API-Key or Authorization: Bearer"
        )
    if not allowed:
        return error_response(403, "forbidden", "this API key may not read this account")
    return None


async def _raw(source: Any, query: dict[str, Any], reads: Reads) -> AsyncIterator[Document]:
    projection = {"_id": 0, "type": 1, "user_id": 1, "timestamp": 1, "ingested_at": 1}
    async for doc in source.find(query, projection, batch_size=10_000):
        reads.raw_events += 1
        yield doc


async def compute(
    db: Any,
    account: str,
    window: str,
    top: int,
    now: datetime,
    watermark: datetime | None,
    copy_since: datetime | None = None,
    edge_age: timedelta = timedelta(minutes=7),
) -> tuple[dict[str, Any], Reads]:
    """The summary; ``watermark`` must have been read before this call reads buckets."""
    reads = Reads()
    plan = plan_window(window, now)
    total = Counts()
    covered: dict[tuple[Resolution, datetime], datetime] = {}
    for resolution, (start, end) in (("hour", plan.hours), ("minute", plan.minutes)):
        res: Resolution = resolution  # type: ignore[assignment]
        read = await rollup_store.read_buckets(db, res, account, start, end)
        reads.buckets += read.documents
        for doc, counts in read.buckets:
            total.merge(counts)
            covered[(res, doc["start"])] = doc["w"]
    bucketed_end = plan.minutes[1]
    tail: dict[str, Any] = {"account_id": account,
                            "timestamp": {"$gte": plan.start, "$lt": bucketed_end}}  # fmt: skip
    if watermark is not None:
        tail["ingested_at"] = {"$gt": watermark}
    # the tail is small: read it from events_recent while that still covers it
    tail_in_recent = store.recent_covers(watermark, now, copy_since)
    # an event in the current minute was ingested at most MAX_FUTURE + 1 min ago
    edge_in_recent = store.recent_covers(now - edge_age, now, copy_since)
    edge = {"account_id": account, "timestamp": {"$gte": plan.edge[0], "$lt": plan.edge[1]}}
    recent, events = store.recent(db), store.events(db)
    reads_needed: list[tuple[Any, dict[str, Any]]]
    if tail_in_recent == edge_in_recent:
        # one read for both: on FerretDB every read scans the whole collection
        reads_needed = [(recent if tail_in_recent else events, {"$or": [tail, edge]})]
    else:
        reads_needed = [(recent if tail_in_recent else events, tail),
                        (recent if edge_in_recent else events, edge)]  # fmt: skip
    for source, query in reads_needed:
        async for doc in _raw(source, query, reads):
            ts = doc["timestamp"]
            if ts >= plan.edge[0]:  # the partial current minute: no bucket, count all
                total.add_event(doc["type"], doc["user_id"])
                continue
            res = "hour" if ts < plan.hours[1] else "minute"
            bucket_w = covered.get((res, floor(ts, res)))
            if bucket_w is None or doc["ingested_at"] > bucket_w:
                total.add_event(doc["type"], doc["user_id"])
    body = {
        "account_id": account,
        "window": window,
        "from": iso(plan.start),
        "to": iso(plan.to),
        "total": total.total,
        "totals": dict(sorted(total.types.items())),
        "unique_users": len(total.users),
        "top_users": top_users(total.users, top),
        "as_of": iso(now),
    }
    return body, reads


def cache_key(settings: Settings, account: str, window: str, top: int, w: datetime | None) -> str:
    stamp = w.isoformat() if w else "none"
    return f"{settings.mongo_db}:summary:{account}:{window}:{top}:{stamp}"


async def get_summary(request: Request, account_id: str | None = None) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    parsed = parse_request(request, account_id)
    if isinstance(parsed, HTTPResponse):
        return parsed
    account, window, top = parsed
    denied = check_key(request, settings, account)
    if denied:
        return denied
    db = request.app.ctx.db
    redis = request.app.ctx.redis
    try:
        watermark = await rollup_store.read_watermark(db)
        key = cache_key(settings, account, window, top, watermark)
        cached = await _cache_get(redis, key)
        if cached is not None:
            return HTTPResponse(cached, content_type="application/json", headers={"X-Cache": "hit"})
        edge_age = timedelta(seconds=settings.max_future_seconds + 120)

        async def answer() -> tuple[dict[str, Any], Reads]:
            copy_since = await store.recent_copy_since(db)
            now = datetime.now(UTC)
            return await compute(db, account, window, top, now, watermark, copy_since, edge_age)

        in_flight: SingleFlight = request.app.ctx.summaries_in_flight
        body, reads = await in_flight.run(key, answer)
    except PyMongoError:
        return error_response(
            503,
            "unavailable",
            "MongoDB is unreachable; retry later",
            {"Retry-After": str(settings.retry_after_seconds)},
        )
    encoded = _encode(body)
    await _cache_set(redis, key, encoded, settings.summary_cache_seconds)
    headers = {
        "X-Cache": "miss",
        "X-Buckets-Read": str(reads.buckets),
        "X-Raw-Events-Read": str(reads.raw_events),
    }
    return HTTPResponse(encoded, content_type="application/json", headers=headers)


class SingleFlight:
    """Identical summaries asked for concurrently in one worker share one computation.

    Without it, every request that misses the cache for the same key (say 100
    clients polling one account when the watermark moves) recomputes the same
    answer against MongoDB at once. Joiners get the answer of a computation that
    started before they arrived, as a cache hit would; ``as_of`` says when.
    """

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


async def _cache_get(redis: Any, key: str) -> bytes | None:
    try:
        value = await redis.get(key)
    except (RedisError, OSError):
        return None  # the cache is an optimisation; MongoDB still answers
    return value if isinstance(value, bytes) else None


async def _cache_set(redis: Any, key: str, value: bytes, seconds: int) -> None:
    if seconds <= 0:
        return
    try:
        await redis.set(key, value, ex=seconds)
    except (RedisError, OSError):
        return


async def rollup_figures(request: Request) -> dict[str, Live]:
    try:
        watermark = await rollup_store.read_watermark(request.app.ctx.db)
    except Exception:
        return {}
    if watermark is None:
        return {}
    lag = (datetime.now(UTC) - watermark).total_seconds()
    return {"rollup_lag_seconds": Live("Seconds between now and the rollup watermark", lag)}
