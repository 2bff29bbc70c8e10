"""Every Redis key and MongoDB collection name the service uses, in one place.

Redis keys of one stream partition share a Redis Cluster hash tag
(``{events:ingest:0}``), so the scripts that touch several of them (enqueue,
acknowledge with tail) run on one slot; so do the rollups processes' leases
(``{events_service:rollups}``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

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


# Rollup partitions (rollups/lease.py): accounts map to ROLLUP_PARTITIONS partitions by
# a stable hash, independent of the stream partitions (a batch's stream partition is
# its first event's account's; an account's tail entries may sit in every stream
# partition). The flusher marks an account in the dirty set of its rollup partition
# inside the stream partition that holds the tail entry, so the acknowledge script
# still touches one Redis Cluster slot; a rollups process reads its partitions' sets
# in every stream partition. With one rollup partition the names are those of before.
_ROLLUP_SEED = 0x5EED  # another hash than the stream partitions' (crc32 from 0)


def rollup_partition_of(settings: Settings, account_id: str) -> int:
    """The rollup partition of an account: stable across processes, hosts and restarts."""
    if settings.rollup_partitions == 1:
        return 0
    return zlib.crc32(account_id.encode(), _ROLLUP_SEED) % settings.rollup_partitions


def rollup_lane(settings: Settings, rollup_partition: int) -> str:
    """A rollup partition named with the layout it belongs to (``"3/8"``): what a bucket
    document records, so a pass reads one partition's buckets by their start (a bucket
    written under another ``ROLLUP_PARTITIONS`` is simply not found that way)."""
    return f"{rollup_partition}/{settings.rollup_partitions}"


def dirty_set(settings: Settings, part: Partition, rollup_partition: int) -> str:
    """Accounts of one rollup partition with tail entries in this stream partition that
    the rollups have not applied yet."""
    if settings.rollup_partitions == 1:
        return f"{{{part.tag}}}:dirty"
    return f"{{{part.tag}}}:dirty:{rollup_partition}"


def account_dirty_set(settings: Settings, part: Partition, account_id: str) -> str:
    return dirty_set(settings, part, rollup_partition_of(settings, account_id))


def rollup_schedule(settings: Settings, rollup_partition: int) -> str:
    """A rollup partition's accounts, scored by the minute a bucket of theirs leaves a
    window."""
    if settings.rollup_partitions == 1:
        return f"{settings.mongo_db}:rollups:schedule"
    return f"{{{settings.mongo_db}:rollups:{rollup_partition}}}:schedule"


@dataclass(frozen=True)
class OtherSet:
    """A rollup set of another partition count than the current one."""

    kind: str  # "dirty", "schedule" or "retire"
    key: str
    part: Partition | None = None  # a dirty set's stream partition


def other_layout_sets(settings: Settings, largest: int) -> list[OtherSet]:
    """The rollup sets that the partition counts used before (none above ``largest``)
    named and the current one does not: the names of one partition if it is more now,
    and those of the partitions past the current count."""
    current = settings.rollup_partitions
    layouts: list[tuple[Settings, range]] = []
    if current > 1:
        layouts.append((replace(settings, rollup_partitions=1), range(1)))
    if largest > 1:
        first = current if current > 1 else 0
        layouts.append((replace(settings, rollup_partitions=largest), range(first, largest)))
    found = []
    for layout, numbers in layouts:
        for number in numbers:
            found += [OtherSet("dirty", dirty_set(layout, part, number), part)
                      for part in partitions(settings)]  # fmt: skip
            found.append(OtherSet("schedule", rollup_schedule(layout, number)))
            found.append(OtherSet("retire", rollup_retire(layout, number)))
    return found


def _coordination(settings: Settings) -> str:
    """The hash tag of the keys the rollups processes coordinate by: one slot, so one
    script takes, renews and gives back any number of partitions' leases."""
    return f"{{{settings.mongo_db}:rollups}}"


def rollup_lease(settings: Settings, rollup_partition: int) -> str:
    """Who holds a rollup partition, and under which fencing token (``owner token``)."""
    return f"{_coordination(settings)}:lease:{rollup_partition}"


def rollup_wanted(settings: Settings, rollup_partition: int) -> str:
    """A backfill or an erasure waiting for the partition (its owner id, lapsing)."""
    return f"{_coordination(settings)}:wanted:{rollup_partition}"


def rollup_fence(settings: Settings) -> str:
    """The fencing-token counter: one more on every acquisition of any partition."""
    return f"{_coordination(settings)}:fence"


def rollup_members(settings: Settings) -> str:
    """The live rollups processes, scored by when their heartbeat lapses."""
    return f"{_coordination(settings)}:members"


def rollup_layouts(settings: Settings) -> str:
    """The largest ROLLUP_PARTITIONS any rollups process ran with (so the sets of another
    layout are found and drained after a change)."""
    return f"{_coordination(settings)}:layouts"


def rollup_progress(settings: Settings, rollup_partition: int) -> str:
    """The minute the last complete pass over the partition rolled every due account to."""
    return f"{_coordination(settings)}:minute:{rollup_partition}"


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


def rollup_retire(settings: Settings, rollup_partition: int) -> str:
    """A rollup partition's accounts scored by when what they superseded is due for
    deletion if they do not roll again meanwhile (rollups/sweep.py)."""
    if settings.rollup_partitions == 1:
        return f"{settings.mongo_db}:rollups:retire"
    return f"{{{settings.mongo_db}:rollups:{rollup_partition}}}:retire"


def rollup_schedule_kept(settings: Settings) -> str:
    """Set once the schedules are built: its absence means Redis lost them."""
    return f"{settings.mongo_db}:rollups:schedule-kept"
