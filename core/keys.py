"""Every Redis key and MongoDB collection name the service uses, in one place.

Redis keys of one stream partition share a Redis Cluster hash tag
(``{events:ingest:0}``), so the scripts that touch several of them (enqueue,
acknowledge with tail) run on one slot.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from core.settings import Settings

# MongoDB collections
EVENTS = "events"  # raw events, _id = account_id|event_id
HEADS = "rollup_heads"  # one per account: where its rollups stand
WINDOWS = "rollup_windows"  # immutable per-account window aggregates
INDEXES = "rollup_indexes"  # immutable per-account lists of non-empty buckets
MINUTES = "rollup_minutes"  # per-account minute buckets
HOURS = "rollup_hours"  # per-account hour buckets
STATE = "rollup_state"  # rollup job state (retention progress)
BACKFILLS = "rollup_backfills"  # checkpoints of unfinished backfills
DRAFTS = "rollup_drafts"  # documents a rollover is writing, until its head is published
API_KEYS = "api_keys"  # keys as data: hashed, scoped (core/api_keys.py)
DEAD_LETTER_AUDIT = "dead_letter_audit"  # who dropped or replayed which dead letter, and why

GROUP = "flusher"  # the consumer group every flusher joins


@dataclass(frozen=True)
class Partition:
    """The Redis keys of one stream partition."""

    index: int
    tag: str

    @property
    def stream(self) -> str:
        return f"{{{self.tag}}}:stream"

    @property
    def depth(self) -> str:
        """Accepted events not yet stored (the queue bound is checked against it)."""
        return f"{{{self.tag}}}:depth"

    @property
    def dead(self) -> str:
        return f"{{{self.tag}}}:dead"

    @property
    def dirty(self) -> str:
        """Accounts with tail entries the rollup job has not applied yet."""
        return f"{{{self.tag}}}:dirty"

    def tail(self, account_id: str) -> str:
        """Events of one account stored since its last rollover."""
        return f"{{{self.tag}}}:tail:{account_id}"

    def head(self, account_id: str) -> str:
        """A copy of the account's rollup head, read with the tail (in the account's partition)."""
        return f"{{{self.tag}}}:head:{account_id}"

    def rate(self, client_id: str, second: int) -> str:
        return f"{{{self.tag}}}:rate:{client_id}:{second}"

    def account_rate(self, account_id: str, second: int) -> str:
        """Events an account added in one second (service/quotas.py)."""
        return f"{{{self.tag}}}:arate:{account_id}:{second}"

    def account_types(self, account_id: str, day: int) -> str:
        """The distinct event types an account used on one UTC day."""
        return f"{{{self.tag}}}:types:{account_id}:{day}"

    def key_accounts(self, key_id: str, hour: int) -> str:
        """The distinct accounts a key wrote to in one hour."""
        return f"{{{self.tag}}}:kacc:{key_id}:{hour}"


def partitions(settings: Settings) -> list[Partition]:
    return [Partition(i, f"{settings.stream_key}:{i}") for i in range(settings.stream_partitions)]


def partition_of(settings: Settings, account_id: str) -> Partition:
    """The partition a batch goes to: by its first event's account (a batch is never split)."""
    index = zlib.crc32(account_id.encode()) % settings.stream_partitions
    return Partition(index, f"{settings.stream_key}:{index}")


def head_copy(settings: Settings, account_id: str) -> str:
    """The Redis copy of an account's rollup head: in its partition, beside its tail."""
    return partition_of(settings, account_id).head(account_id)


def lease(settings: Settings) -> str:
    return f"{settings.mongo_db}:rollups:lease"


def rollup_schedule(settings: Settings) -> str:
    """Accounts scored by the minute a bucket of theirs leaves a window."""
    return f"{settings.mongo_db}:rollups:schedule"


def rollup_progress(settings: Settings) -> str:
    """The minute the last complete rollover pass rolled every due account to."""
    return f"{settings.mongo_db}:rollups:minute"


def answer_cache(settings: Settings, answer: str) -> str:
    """A cached /summary or /timeseries answer (``answer`` names the route, the question,
    the minute, the tail and the head: ``service/snapshot.py``)."""
    return f"{settings.mongo_db}:answer:{answer}"


def api_keys_version(settings: Settings) -> str:
    """Bumped on every change to the stored API keys: workers reload when it moves."""
    return f"{settings.mongo_db}:api_keys:version"


def stream_watched(settings: Settings) -> str:
    """Accounts someone follows on GET /stream, scored by when that lapses."""
    return f"{settings.mongo_db}:stream:watched"


def stream_channel(settings: Settings, account_id: str) -> str:
    """Where the flusher publishes an account's newly stored events for /stream."""
    return f"{settings.mongo_db}:stream:events:{account_id}"


# Erasure (core/erasure.py): jobs and their audit in MongoDB, tombstones in Redis
ERASURES = "erasures"  # one job per erasure scope: its state and progress
ERASURE_AUDIT = "erasure_audit"  # one record per run: who, what, when, how many; no personal data


def erasure_tombstones(settings: Settings) -> str:
    """Scopes the flusher must not store (a hash: run id -> tombstone, and a version
    field every change bumps, so flushers reload only when it moved)."""
    return f"{settings.mongo_db}:erasure:tombstones"


def erasure_dropped(settings: Settings) -> str:
    """Queued events each tombstone kept out of the store (a hash: run id -> count)."""
    return f"{settings.mongo_db}:erasure:dropped"


def rollup_retire(settings: Settings) -> str:
    """Heads whose retired documents are due for deletion (rollups/sweep.py), by time."""
    return f"{settings.mongo_db}:rollups:retire"


def rollup_schedule_kept(settings: Settings) -> str:
    """Set once the schedule is built: its absence means Redis lost the schedule."""
    return f"{settings.mongo_db}:rollups:schedule-kept"
