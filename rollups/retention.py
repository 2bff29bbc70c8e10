"""Retention, the one owner of deleting old data: raw events, minute and hour buckets.

Everything is deleted by equality on one indexed field, a whole minute or
hour at a time, walking forward from where the last sweep stopped (kept in
``rollup_state``), so no sweep ever scans a collection. Raw events go this
way only where the server has no TTL index (FerretDB); on MongoDB the TTL
index on ``timestamp`` does it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core import keys, metrics, store
from core.buckets import HOUR, MINUTE, Resolution, floor, to_datetime
from core.settings import Settings
from core.store import Database

log = logging.getLogger(__name__)

STATE_ID = "retention"
MAX_STEPS_PER_SWEEP = 240  # bounded work per call; the next sweep goes on


@dataclass(frozen=True)
class Track:
    """One kind of data to expire: where its cut-off is and how to delete a step."""

    name: str
    step: Resolution
    keep_ms: int


class Retention:
    def __init__(self, db: Database, settings: Settings, raw_by_delete: bool) -> None:
        self.db = db
        self.tracks = [
            Track("minutes", "minute", settings.minute_retention_hours * HOUR),
            Track("hours", "hour", settings.hour_retention_days * 24 * HOUR),
        ]
        if raw_by_delete:
            self.tracks.append(Track("events", "hour", settings.raw_retention_days * 24 * HOUR))

    async def sweep(self, now_ms: int) -> dict[str, int]:
        """Delete what expired since the last sweep; how many documents, per collection."""
        state = await self.db[keys.STATE].find_one({"_id": STATE_ID}) or {}
        deleted: dict[str, int] = {}
        for track in self.tracks:
            step = HOUR if track.step == "hour" else MINUTE
            cutoff = floor(now_ms - track.keep_ms, track.step)  # steps before it are expired
            # nothing older than the first sweep's cut-off can exist: no event is
            # accepted past raw retention, no bucket is written past its own
            done = state.get(track.name, cutoff)
            steps = 0
            count = 0
            while done < cutoff and steps < MAX_STEPS_PER_SWEEP:
                count += await self._delete(track, done)
                done += step
                steps += 1
            await self._save(track.name, done)
            if count:
                metrics.RETENTION_DELETED.labels(track.name).inc(count)
                log.info("retention: deleted %d %s before %s", count, track.name,
                         to_datetime(done).isoformat())  # fmt: skip
            deleted[track.name] = count
        return deleted

    async def _save(self, name: str, done: int) -> None:
        state = self.db[keys.STATE]
        await store.retry_duplicate_key(
            lambda: state.update_one({"_id": STATE_ID}, {"$set": {name: done}}, upsert=True)
        )

    async def _delete(self, track: Track, start: int) -> int:
        when = to_datetime(start)
        if track.name == "events":
            return await store.delete_expired_hour(self.db, when)
        collection = keys.MINUTES if track.name == "minutes" else keys.HOURS
        result = await self.db[collection].delete_many({"start": when})
        return result.deleted_count
