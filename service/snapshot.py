"""An account read at one moment: its live tail, its head and the clock, for /summary and
/timeseries alike.

A read takes the account's tail in every partition with the Redis clock
(``to``) and, on a first try, the copy of the account's head the rollup job
keeps beside it, in one atomic call; without a copy (or on a retry) the head
comes from the store, read after the tail. What an answer is computed from is
then fixed: the events stored before ``to`` are the head's documents plus the
tail entries it has not applied. A rollover that replaces a document the read
still needs makes it raise :class:`Raced`, and the read is simply redone
(:func:`consistently`).

The same snapshot names its answer in the caches (:meth:`Snapshot.cache_key`):
the question, the minute, the newest tail entry per partition and the head's
version. A newly stored event appends a tail entry with a newer id; a rollover
trims the tail only after storing a head of a higher version. So whatever
happens in the meantime, including a second rollover in the same minute that
trims the tail back to what it was, a stored event always changes the key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pymongo.errors import PyMongoError

from core import keys
from core.buckets import floor
from core.connections import REDIS_ERRORS, Redis
from core.figures import Reads
from core.rollup_docs import Head, KeptDocuments, load_index, read_head
from core.settings import Settings
from core.store import Database
from core.tail import StreamId, TailEntry, last_ids, read_tails
from service.errors import Unavailable
from service.tail_counts import Running

T = TypeVar("T")

ATTEMPTS = 20  # a read that raced a rollover is simply redone


class Raced(Exception):
    """A rollover replaced what this read was looking at; read again."""


@dataclass
class Snapshot:
    """The tail as read at ``to`` (all of it, or only what came after ``previous``'s
    entries) and the account's head, once known."""

    to: int
    entries: list[TailEntry]
    previous: Running | None = None  # a running count the entries continue
    head: Head | None = None
    head_known: bool = False  # ``head`` is the account's head (None: it has none)
    head_reads: int = 0  # store documents read for the head

    async def know_head(self, db: Database, account: str) -> Head | None:
        """The head read with the tail, else the store's (read after the tail)."""
        if not self.head_known:
            self.head = await read_head(db, account)
            self.head_known, self.head_reads = True, 1
        return self.head

    def newest(self) -> dict[int, StreamId]:
        """The newest tail entry per partition, those counted before included."""
        return last_ids(self.entries, self.previous.last if self.previous else None)

    def cache_key(self, *question: str) -> str:
        """The name of the answer to ``question`` at this snapshot (see the module)."""
        assert self.head_known, "the head is part of the key"
        tails = ",".join(f"{p}:{i[0]}-{i[1]}" for p, i in sorted(self.newest().items()))
        version = self.head.version if self.head is not None else 0
        return ":".join((*question, str(floor(self.to, "minute")), tails or "-", f"v{version}"))


async def read_snapshot(
    db: Database,
    redis: Redis,
    settings: Settings,
    account: str,
    previous: Running | None = None,
    head_copy: bool = True,
) -> Snapshot:
    """The tail (after ``previous``'s entries) and the head: the Redis copy read with the
    tail if ``head_copy`` and there is one, else the store's."""
    after = previous.last if previous is not None else None
    copy_key = keys.head_copy(settings, account) if head_copy else None
    read = await read_tails(redis, keys.partitions(settings), account, after, copy_key)
    snapshot = Snapshot(read.to, read.entries, previous)
    if read.head is not None:
        snapshot.head, snapshot.head_known = Head.from_copy(read.head), True
    await snapshot.know_head(db, account)
    return snapshot


async def head_moved(redis: Redis, settings: Settings, account: str, key: str) -> bool:
    """Whether the account's head moved on since the snapshot an answer's cache ``key``
    names (its version is the key's last part): an answer computed before an erasure
    finished must not go to a request that arrived after (``SingleFlight``'s ``stale``).
    One HGET; without a copy of the head (an idle account's lapsed) it has not moved."""
    version = key.rpartition(":v")[2]
    current: Any = await redis.hget(keys.head_copy(settings, account), "v")
    return current is not None and version.isdigit() and int(current) > int(version)


async def with_index(db: Database, head: Head, reads: Reads, docs: KeptDocuments | None) -> None:
    """Fill in the head's bucket lists, from memory when this worker read them before."""
    if head.index is not None and (docs is None or docs.index(head.index) is None):
        reads.documents += 1
    if not await load_index(db, head, docs):
        raise Raced("the head's bucket index was superseded")


async def consistently(read: Callable[[int], Awaitable[T]]) -> tuple[T, int]:
    """What ``read(attempt)`` returns, and on which attempt (from 1): a read that raced a
    rollover is redone."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await read(attempt), attempt
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
