"""What each HTTP worker keeps between reads of /summary and /timeseries.

- **Answers** (:class:`AnswerCache`): encoded answers by the key their
  snapshot names (``service/snapshot.py``), for ``SUMMARY_CACHE_SECONDS``, in
  the worker's memory (a byte budget, least recently used go) and in Redis,
  for the workers and hosts that have not asked yet. A key changes with every
  stored event, so no cached answer hides one.
- **One computation per question** (:class:`SingleFlight`): identical
  requests arriving together share one.
- **Running counts** of accounts' tails (``service/tail_counts.py``) and the
  **rollup documents** read before (``core.rollup_docs.KeptDocuments``,
  ``SUMMARY_MEMORY_MB``): both immutable or only ever advanced, so a worker
  reads only what is new.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from cachetools import TLRUCache
from sanic import HTTPResponse

from core import keys
from core.connections import REDIS_ERRORS, Redis
from core.figures import Reads
from core.rollup_docs import KeptDocuments
from core.settings import Settings
from service.tail_counts import RunningTails

T = TypeVar("T")

ANSWER_BYTES = 32 * 2**20  # per worker; a 30d series in 1h steps is ~100 KB


def _answer_size(body: bytes) -> int:
    return len(body) + 200  # the key and the entry beside the body


class AnswerCache:
    """Encoded answers, each kept ``SUMMARY_CACHE_SECONDS`` here and in Redis."""

    def __init__(self, redis: Redis, settings: Settings, budget: int = ANSWER_BYTES) -> None:
        self._redis, self._settings = redis, settings
        self._seconds = settings.summary_cache_seconds
        self._kept: TLRUCache[str, bytes] = TLRUCache(
            budget, lambda _key, _body, now: now + self._seconds, getsizeof=_answer_size
        )

    async def get(self, key: str, shared: bool) -> bytes | None:
        """The answer kept here; with ``shared``, else the one another worker put in Redis."""
        if self._seconds <= 0:
            return None
        found = self._kept.get(key)
        if found is None and shared:
            try:
                value = await self._redis.get(keys.answer_cache(self._settings, key))
            except REDIS_ERRORS:
                return None  # the cache is an optimisation
            found = value if isinstance(value, bytes) else None
        return found

    async def keep(self, key: str, body: bytes) -> None:
        if self._seconds <= 0:
            return
        if _answer_size(body) <= self._kept.maxsize:
            self._kept[key] = body
        try:
            await self._redis.set(keys.answer_cache(self._settings, key), body, ex=self._seconds)
        except REDIS_ERRORS:
            return


def cached_answer(body: bytes) -> HTTPResponse:
    return HTTPResponse(body, content_type="application/json", headers={"X-Cache": "hit"})


async def fresh_answer(answers: AnswerCache, key: str, body: bytes, reads: Reads) -> HTTPResponse:
    """An answer just computed: kept under ``key``, sent with what computing it read."""
    await answers.keep(key, body)
    headers = {
        "X-Cache": "miss",
        "X-Documents-Read": str(reads.documents),
        "X-Tail-Events-Read": str(reads.tail_events),
    }
    return HTTPResponse(body, content_type="application/json", headers=headers)


class SingleFlight:
    """Identical computations asked for concurrently in one worker share one run.

    A request that joins a run may have arrived after that run read its snapshot;
    ``stale`` (if given) says whether the shared result may not be served to it (an
    erasure finished meanwhile: ``service/snapshot.py`` ``head_moved``), and then it
    computes afresh."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    async def run(
        self,
        key: str,
        compute: Callable[[], Awaitable[T]],
        stale: Callable[[T], Awaitable[bool]] | None = None,
    ) -> T:
        # a finished run is always gone from ``_running`` before its joiners resume
        while (running := self._running.get(key)) is not None:
            try:
                joined = cast(T, await asyncio.shield(running))
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request itself was cancelled
                continue  # the leader went away mid-way: take over (or join the next one)
            if stale is None or not await stale(joined):
                return joined
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


@dataclass
class WorkerMemory:
    """Everything above, for one HTTP worker."""

    answers: AnswerCache
    in_flight: SingleFlight
    tails: RunningTails
    docs: KeptDocuments | None  # None: every rollup document is read from the store

    @classmethod
    def for_settings(cls, settings: Settings, redis: Redis) -> WorkerMemory:
        budget = settings.summary_memory_mb * 2**20
        docs = KeptDocuments(budget) if budget else None
        return cls(AnswerCache(redis, settings), SingleFlight(), RunningTails(), docs)
