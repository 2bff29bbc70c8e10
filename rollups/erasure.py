"""Erasing a user, a time range or a whole account: its raw events, and every figure
derived from them (``core/erasure.py`` has the scope, the tombstones and the records).

An erasure runs as the rollup job does: it asks for the lease of the account's
rollup partition, which its rollups process hands over at its next tick
(``rollups/lease.py``), so nothing rolls the account meanwhile; ingest goes on.
For a user or a range:

1. **Tombstone.** From now on no flusher stores the scope's events, queued ones
   included. Then it waits until every stream entry a flusher had read before
   (and may have checked before the tombstone) is stored and acknowledged
   (``draining``): after that, every stored event of the scope is in the live
   tail or the buckets, and no more will come.
2. **Roll** the account to the current minute ``M``: every tail entry is then
   applied, so the scope's stored events before ``M`` are in the buckets and
   those at or after ``M`` only in the tail.
3. **Tail**: the scope's events are taken out of the live tail (entry ids kept).
4. **Corrections** (``counting``): per minute, the scope's raw events before
   ``M``, counted from MongoDB, become signed corrections that one rollover
   applies to the minute and hour buckets (and hour series) and every window
   aggregate, as the backfill does; the new head carries one more erasure, which
   makes every reader's running count of the tail start afresh, and the run's id,
   so a run resumed after a crash knows its corrections are in. Hours older than
   the raw retention (minus a margin) may have lost raw events: there the hour
   buckets say what was counted (see :meth:`Eraser._old_hour`).
5. **Raw events** are deleted hour by hour (``deleting``; the job records each
   hour done, so a resumed run goes on from there).
6. **Dead letters** lose the scope's events, and the tombstone is narrowed to the
   entries queued before now: the job is done.

A whole account: after the tombstone and the drain, its head is replaced by an
empty one (one more erasure, its version kept so no stale rollover or cached
answer can come back), then its live tail, every other rollup document, its raw
events and dead letters' events go.

Every step is idempotent, and the job (``erasures``) records where the run is, so
running the same erasure again after a crash (or a failure: the lease busy, the
queue not draining) resumes it; after a finished run it starts another that
erases what came since, if anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pymongo.errors import PyMongoError
from redis.exceptions import ResponseError

from core import erasure, keys, metrics, store
from core.buckets import HOUR, MINUTE, Counts, floor, ms, to_datetime
from core.connections import Redis
from core.erasure import ErasureError, Job, Scope
from core.rollup_docs import COLLECTIONS, Head, Kind, read_packed, read_series
from core.settings import Settings
from core.store import Database
from core.tail import redis_time_ms
from rollups.lease import Leases
from rollups.rollover import HeadConflict, Roller

log = logging.getLogger(__name__)

CONFLICTS = 5  # a rollover that raced this one (a stale rollups job): start the step again
DRAIN_POLL_SECONDS = 0.1
DELETES_AT_ONCE = 8
FIELDS = {"_id": 0, "timestamp": 1, "type": 1, "user_id": 1, "account_id": 1}
ROLLUP_KINDS = (keys.WINDOWS, keys.INDEXES, keys.MINUTES, keys.HOURS)


class ErasureBusy(ErasureError):
    """The account's rollup partition stayed with a backfill or another erasure."""


Progress = Callable[[Job], None]


class Eraser:
    def __init__(self, db: Database, redis: Redis, settings: Settings, by: str,
                 progress: Progress = lambda _: None) -> None:  # fmt: skip
        self.db = db
        self.redis = redis
        self.settings = settings
        self.by = by
        self.progress = progress
        self.lease = Leases(redis, settings, "erasure", settings.maintenance_lease_seconds)
        self.roller = Roller(db, redis, settings, fence=self.lease.held)

    async def erase(self, scope: Scope) -> Job:
        """Run (or resume) the scope's erasure to its end; the job, done."""
        scope.check(self.settings, redis_time_ms(await self.redis.time()))
        partition = keys.rollup_partition_of(self.settings, scope.account)
        if not await self.lease.take([partition], self.settings.erasure_lease_seconds):
            raise ErasureBusy(
                "the account's rollup partition stayed with a backfill or another erasure for "
                f"{self.settings.erasure_lease_seconds:.0f} s; nothing was erased yet: run it "
                "again later"
            )
        job: Job | None = None
        try:
            job = await erasure.open_job(self.db, scope, self.by)
            await self._run(scope, job)
            metrics.ERASURE_RUNS.labels(scope.kind, "done").inc()
            return job
        except BaseException as exc:
            if job is not None and job.state != erasure.DONE:
                metrics.ERASURE_RUNS.labels(scope.kind, "failed").inc()
                reason = (
                    str(exc) if isinstance(exc, ErasureError) else f"{type(exc).__name__}: {exc}"
                )
                try:
                    await erasure.fail_job(self.db, job, reason)
                except PyMongoError:
                    log.warning("could not record the failure of erasure %s", job.id)
            raise
        finally:
            try:
                await self.lease.release()
            except Exception:  # it lapses by itself
                log.warning("could not release the rollup partition's lease", exc_info=True)

    async def _hold(self) -> None:
        if not await self.lease.hold():
            raise ErasureError("lost the rollup partition's lease (a step took longer than its "
                               f"{self.settings.maintenance_lease_seconds:.0f} s); run the "
                               "erasure again")  # fmt: skip

    async def _step(self, job: Job, step: str) -> None:
        await self._hold()
        job.step = step
        await erasure.save_job(self.db, job)
        self.progress(job)

    async def _run(self, scope: Scope, job: Job) -> None:
        head = await self.roller.head(scope.account)
        await erasure.settle_corrected(self.db, scope.account, head.erasure)
        if head.erasure == job.run_id:
            job.corrected = True
        await self._step(job, "draining")
        await erasure.put_tombstone(self.redis, self.settings,
                                    erasure.Tombstone.of(scope, job.run_id))  # fmt: skip
        await self._drain()
        minute = floor(redis_time_ms(await self.redis.time()), "minute")
        if scope.kind == "account":
            await self._account(scope, job, minute)
        else:
            await self._events(scope, job, minute)
        await self._step(job, "dead letters")
        job.dead_letter_events += await erasure.scrub_dead_letters(self.redis, self.settings,
                                                                   scope)  # fmt: skip
        await self._hold()
        before = await erasure.finish_tombstone(self.redis, self.settings, job.run_id)
        await erasure.finish_job(self.db, job, None if before is None else to_datetime(before))
        self.progress(job)
        try:
            await erasure.prune_tombstones(self.db, self.redis, self.settings)
        except (PyMongoError, ResponseError):
            log.warning("pruning erasure tombstones failed; the rollups process tries again")

    async def _drain(self) -> None:
        """Wait until the entries flushers had read (pending) when the tombstone was set
        are acknowledged: they may have been checked before it."""
        waiting: dict[str, set[bytes]] = {}
        for part in keys.partitions(self.settings):
            ids = await self._pending(part.stream)
            if ids:
                waiting[part.stream] = ids
        deadline = time.monotonic() + self.settings.erasure_drain_seconds
        while waiting:
            for stream in list(waiting):
                waiting[stream] &= await self._pending(stream)
                if not waiting[stream]:
                    del waiting[stream]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                left = sum(len(ids) for ids in waiting.values())
                raise ErasureError(
                    f"{left} queued batches a flusher had read before the erasure began are "
                    f"still not stored after {self.settings.erasure_drain_seconds:.0f} s (is "
                    "a flusher running?); none of the erased events will be stored meanwhile: "
                    "run the erasure again once the flushers run"
                )
            await self._hold()
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    async def _pending(self, stream: str) -> set[bytes]:
        try:
            found: Any = await self.redis.xpending_range(stream, keys.GROUP, "-", "+", 100_000)
        except ResponseError as exc:  # no stream or no group yet: nothing read
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                return set()
            raise
        return {p["message_id"] for p in found}

    # -- a user or a time range ---------------------------------------------------------

    async def _events(self, scope: Scope, job: Job, minute: int) -> None:
        for attempt in range(CONFLICTS):
            try:
                await self._correct(scope, job, minute)
                break
            except HeadConflict:
                if attempt == CONFLICTS - 1:
                    raise ErasureError("another rollups job kept moving the account's head; "
                                       "run the erasure again") from None  # fmt: skip
                self.roller.forget_heads()
        await self._delete_raw(scope, job)

    async def _correct(self, scope: Scope, job: Job, minute: int) -> None:
        account = scope.account
        if await self._never_counted(account):
            job.corrected = True  # nothing to take out of figures; raw events may remain
            return
        await self._step(job, "rolling")
        await self.roller.roll(account, minute)  # 2. every tail entry applied
        head = await self.roller.head(account)
        upto = int(head.minute) if head.minute is not None else minute  # (a stored Int64)
        await self._step(job, "tail")
        job.tail_events += await erasure.scrub_tails(self.redis, self.settings, scope)  # 3.
        if job.corrected:
            return
        await self._step(job, "counting")  # 4.
        corrections = await self._corrections(scope, head, upto, job)
        removed = -sum(c.total for c in corrections.values())
        await self._step(job, "correcting")
        try:
            rolled = await self.roller.roll(account, upto, corrections, erasure=job.run_id)
        except ValueError as exc:  # a count would go below zero
            raise ErasureError(
                f"the rollups of {account} hold fewer of these events than MongoDB does ({exc}); "
                "run `python -m scripts.backfill_rollups` over the last days, then the erasure "
                "again"
            ) from exc
        job.corrected, job.rollup_events = True, removed
        await erasure.save_job(self.db, job)
        # the documents it superseded still count the scope: gone now, not at the account's
        # next rollover (an idle account may not roll for days); a reader still holding
        # the previous head finds one missing and reads again (service/snapshot.py)
        assert rolled is not None  # an erasure always writes a head
        gate = asyncio.Semaphore(DELETES_AT_ONCE)

        async def delete(kind: Kind, doc_id: str) -> None:
            async with gate:  # by _id equality: what FerretDB serves from an index
                await self.db[COLLECTIONS[kind]].delete_one({"_id": doc_id})

        await asyncio.gather(*(delete(kind, doc_id) for kind, doc_id in rolled.head.retired))

    async def _corrections(
        self, scope: Scope, head: Head, upto: int, job: Job
    ) -> dict[int, Counts]:
        """Per minute, minus the scope's events the buckets hold (all stored before ``upto``)."""
        now = redis_time_ms(await self.redis.time())
        complete = erasure.complete_from(self.settings, now)
        per_minute: dict[int, Counts] = {}
        hours = sorted(h for h in head.hours if h < upto and scope.covers_hour(h))
        job.hours_total, job.hours_done = len(hours), 0
        for hour in hours:  # only hours with a bucket can hold counted events
            query = scope.raw_query(hour)
            async for doc in store.events(self.db).find(query, FIELDS, batch_size=10_000):
                ts = ms(doc["timestamp"])
                if ts >= upto or not scope.matches(doc["account_id"], doc["user_id"], ts):
                    continue  # at or after the head's minute: only in the tail (taken out)
                m = floor(ts, "minute")
                per_minute.setdefault(m, Counts()).remove_event(doc["type"], doc["user_id"])
            job.hours_done += 1
            await self._hold()
            self.progress(job)
        for hour in hours:
            # raw events may have gone: the buckets say what was counted (a range's ends are
            # whole hours there; one that became old only since it was checked still has
            # its raw events, within the margin)
            if hour < complete and scope.covers_whole_hour(hour):
                await self._old_hour(scope, head, hour, per_minute)
        return {m: c for m, c in per_minute.items() if c.total or c.types or c.users}

    async def _counts(self, kind: str, doc_id: str | None) -> Counts:
        if doc_id is None:
            return Counts()
        packed = await read_packed(self.db, kind, doc_id)  # type: ignore[arg-type]
        if packed is None:
            raise LookupError(f"{kind} bucket {doc_id} is missing")
        return packed.unpack()

    async def _old_hour(self, scope: Scope, head: Head, hour: int,
                        per_minute: dict[int, Counts]) -> None:  # fmt: skip
        """Corrections for an hour whose raw events may be gone (older than the raw
        retention minus a margin), from what its buckets hold.

        A range takes the hour whole (its ends are whole hours there): the hour bucket
        and its series, and minute buckets where they are kept, say exactly what it
        held. A user: the hour bucket says how many of the hour's events were theirs;
        those the raw events no longer show come off the total and the user's count,
        minute by minute (by the minute buckets where kept, else from the earliest
        minutes of the hour's series that have room); what types they had is not kept
        anywhere, so the hour's per-type counts keep them."""
        hour_id = head.bucket_doc_id("hour", hour)
        if hour_id is None:
            return
        bucket = await self._counts("hour", hour_id)
        series = await read_series(self.db, hour_id)
        if series is None:
            raise LookupError(f"hour bucket {hour_id} is missing")
        minutes = {m: head.bucket_doc_id("minute", m) for m in head.minutes
                   if hour <= m < hour + HOUR}  # fmt: skip
        if scope.kind == "range":
            rest = bucket.copy()
            for m in range(hour, hour + HOUR, MINUTE):
                per_minute.pop(m, None)  # the raw events found, if any: the buckets instead
            for m, doc_id in sorted(minutes.items()):
                held = await self._counts("minute", doc_id)
                per_minute[m] = negated(held)
                rest.merge(held, -1)
            free = [m for m in sorted(series.minutes) if m not in minutes]
            for m in free:
                total, types = series.minutes[m]
                per_minute[m] = Counts(-total, {t: -n for t, n in types.items()}, {})
            if rest.users:  # what the minute buckets did not hold, on a minute without one
                first = free[0] if free else hour
                per_minute.setdefault(first, Counts()).merge(Counts(0, {}, rest.users), -1)
            return
        user = scope.user
        raw = -sum(c.users.get(user, 0) for m, c in per_minute.items() if hour <= m < hour + HOUR)
        missing = bucket.users.get(user, 0) - raw
        if missing < 0:
            raise ErasureError(
                f"the hour bucket of {hour} holds fewer of this user's events than MongoDB "
                "does; run `python -m scripts.backfill_rollups` over that hour, then the "
                "erasure again"
            )
        for m, doc_id in sorted(minutes.items()):
            if not missing:
                break
            theirs = (await self._counts("minute", doc_id)).users.get(user, 0)
            extra = min(missing, theirs + per_minute.get(m, Counts()).users.get(user, 0))
            if extra > 0:
                per_minute.setdefault(m, Counts()).merge(Counts(extra, {}, {user: extra}), -1)
                missing -= extra
        for m in sorted(series.minutes):
            if not missing:
                break
            if m in minutes:
                continue
            room = series.minutes[m][0] + per_minute.get(m, Counts()).total
            take = min(missing, room)
            if take > 0:
                per_minute.setdefault(m, Counts()).merge(Counts(take, {}, {user: take}), -1)
                missing -= take
        if missing:
            raise ErasureError(f"the hour bucket of {hour} does not add up; run the backfill "
                               "over it, then the erasure again")  # fmt: skip

    async def _delete_raw(self, scope: Scope, job: Job) -> None:
        """The scope's raw events, hour by hour, from where the job stopped."""
        oldest = await erasure.oldest_raw_hour(self.db)
        every = erasure.raw_hours(self.settings, scope, datetime.now(UTC), oldest)
        done = job.deleted_through
        hours = [h for h in every if done is None or h > done]
        job.hours_total, job.hours_done = len(every), len(every) - len(hours)
        await self._step(job, "deleting")
        for hour in hours:
            found = await store.events(self.db).delete_many(scope.raw_query(hour))
            job.events += found.deleted_count
            job.deleted_through = hour
            job.hours_done += 1
            await erasure.save_job(self.db, job)
            await self._hold()
            self.progress(job)

    # -- a whole account ----------------------------------------------------------------

    async def _never_counted(self, account: str) -> bool:
        """No head and no live tail: no figure holds anything of the account (and none is
        made up for it: erasing an account nobody sent anything to leaves no trace)."""
        head = await self.roller.head(account)
        return not head.version and not await self.roller.read_tail(account)

    async def _account(self, scope: Scope, job: Job, minute: int) -> None:
        account = scope.account
        await self._step(job, "rollups")
        version = 0
        if not await self._never_counted(account):
            for attempt in range(CONFLICTS):
                try:
                    version = (await self.roller.reset(account, minute, job.run_id)).version
                    break
                except HeadConflict:
                    if attempt == CONFLICTS - 1:
                        raise ErasureError("another rollups job kept moving the account's "
                                           "head; run the erasure again") from None  # fmt: skip
                    self.roller.forget_heads()
        job.corrected = True
        await erasure.drop_tails(self.redis, self.settings, account)
        # every other head version and rollup document of the account, orphans included
        await self.db[keys.HEADS].delete_many({"account_id": account,
                                               "version": {"$lt": version}})  # fmt: skip
        for name in ROLLUP_KINDS:
            await self.db[name].delete_many({"account_id": account})
            await self._hold()
        await self._delete_raw(scope, job)


def negated(counts: Counts) -> Counts:
    return Counts(-counts.total, {t: -n for t, n in counts.types.items()},
                  {u: -n for u, n in counts.users.items()})  # fmt: skip


assert set(COLLECTIONS.values()) == set(ROLLUP_KINDS)
