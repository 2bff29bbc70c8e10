"""Erasure: what is erased (a scope), what the flusher must not store (tombstones), and the
records an erasure keeps (a job with its progress, an audit record per run).

A **scope** is a user of an account, a time range of an account (events whose
``timestamp`` is in ``[from, to)``), or a whole account. Erasing it
(``rollups/erasure.py``) deletes its raw events and takes them out of every
figure; this module holds what the HTTP workers, the flusher, the rollups
process and the command line share about it.

**Tombstones** keep the scope's queued events out of the store. While an
erasure runs, its tombstone matches the scope's events in every stream entry a
flusher stores; once it is done, only those in entries queued before it
finished (the entry id is the Redis clock when the batch was queued), so
events sent afterwards are stored as usual. Flushers check each flush against
the tombstones (``service/flusher.py``): a matching event is not inserted, one
an earlier attempt stored is deleted, and neither is counted, shown on
``/stream`` or kept in a dead letter. Tombstones live in one Redis hash, with a
version field every change bumps in the same script (a flusher reads only the
version per flush, and the hash when it moved). A finished tombstone is kept
until no stream partition holds an entry queued before it finished: only then
can nothing it matches still be stored (:func:`prune_tombstones`, run by the
rollups process once a minute and by each erasure). So its retention is exactly
as long as the queue holds entries from before the erasure, however long that
is (a flusher outage of days included); an unfinished erasure's tombstone stays
until the erasure is run again and finishes.

**No personal data in the records.** A user is named by ``user_hash`` (SHA-256
of ``account|user_id``: the same user gives the same hash, so "was this user
erased?" can be answered by hashing again, but the hash does not give the id
back), in the job, the audit record and the tombstone alike; the user id itself
is only ever in the memory of the process that erases, so running an erasure
again (to resume it) needs the user id again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from core import keys
from core.buckets import HOUR, floor, ms, to_datetime
from core.connections import Redis
from core.events import CONTROL_CHAR, decode_events, encode_events, is_account_id
from core.export import stored_span
from core.settings import Settings
from core.store import Database, Document
from core.tail import TailEntry, TailEvents, encode, parse_entries

Kind = Literal["user", "range", "account"]
KINDS: tuple[Kind, ...] = ("user", "range", "account")
RAW_SAFETY_MARGIN = 2 * HOUR  # as the backfill's: raw events younger than retention minus it
VERSION_FIELD = "v"
BEFORE_SUFFIX = ":before"


class ErasureRefused(ValueError):
    """An erasure that cannot be asked for like this (a bad account, user or range)."""


class ErasureError(Exception):
    """An erasure that could not finish now; running it again resumes it."""


def user_hash(account: str, user: str) -> str:
    """How records name a user: SHA-256 of ``account|user_id`` ("|" is outside account ids)."""
    return hashlib.sha256(f"{account}|{user}".encode()).hexdigest()


def check_user(user: str) -> str:
    if not 1 <= len(user) <= 128 or CONTROL_CHAR.search(user):
        raise ErasureRefused("the user id must be 1..128 printable characters (no control "
                             "characters), as POST /events takes it")  # fmt: skip
    return user


def check_account(account: str) -> str:
    if not is_account_id(account):
        raise ErasureRefused("the account must be 1..64 characters of A-Z a-z 0-9 _ . : -")
    return account


def complete_from(settings: Settings, now: int) -> int:
    """The first hour whose raw events are surely all still stored: from it on the raw
    events are the truth; before it only the buckets know what was there."""
    horizon = now - settings.raw_retention_days * 24 * HOUR + RAW_SAFETY_MARGIN
    return floor(horizon, "hour") + HOUR


@dataclass(frozen=True)
class Scope:
    """What one erasure erases. ``user`` is the user id itself: never stored (see the module)."""

    kind: Kind
    account: str
    user: str = ""
    start: int | None = None  # epoch ms, range only: [start, end)
    end: int | None = None

    @classmethod
    def of_user(cls, account: str, user: str) -> Scope:
        return cls("user", check_account(account), check_user(user))

    @classmethod
    def of_range(cls, account: str, start: datetime, end: datetime) -> Scope:
        if start.tzinfo is None or end.tzinfo is None:
            raise ErasureRefused("from and to need a time zone (RFC 3339, e.g. "
                                 "2026-11-26T09:00:00Z)")  # fmt: skip
        if end <= start:
            raise ErasureRefused("to must be later than from")
        return cls("range", check_account(account), start=ms(start), end=ms(end))

    @classmethod
    def of_account(cls, account: str) -> Scope:
        return cls("account", check_account(account))

    @property
    def user_hash(self) -> str:
        return user_hash(self.account, self.user) if self.kind == "user" else ""

    @property
    def job_id(self) -> str:
        """The same scope is the same job: running it again resumes or repeats it."""
        if self.kind == "user":
            key = f"user|{self.account}|{self.user_hash}"
        elif self.kind == "range":
            key = f"range|{self.account}|{self.start}|{self.end}"
        else:
            key = f"account|{self.account}"
        return f"{self.kind[0]}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def check(self, settings: Settings, now: int) -> None:
        """A range's ends before the raw horizon must be whole hours: there only hour
        buckets remain, and an hour is taken out of them whole or not at all."""
        if self.kind != "range":
            return
        assert self.start is not None and self.end is not None
        first = complete_from(settings, now)
        for name, edge in (("from", self.start), ("to", self.end)):
            if edge < first and edge % HOUR:
                raise ErasureRefused(
                    f"{name} is older than the raw events still kept "
                    f"({to_datetime(first):%Y-%m-%dT%H:%M}Z on, RAW_RETENTION_DAYS="
                    f"{settings.raw_retention_days} minus a margin): before "
                    "that only hour buckets remain, so the range must start and end on a whole "
                    "hour there"
                )  # fmt: skip

    def matches(self, account: str, user: str, ts: int) -> bool:
        if account != self.account:
            return False
        if self.kind == "user":
            return user == self.user
        if self.kind == "range":
            assert self.start is not None and self.end is not None
            return self.start <= ts < self.end
        return True

    def covers_hour(self, hour: int) -> bool:
        """Whether any of the hour's events can be in the scope."""
        if self.kind != "range":
            return True
        assert self.start is not None and self.end is not None
        return hour + HOUR > self.start and hour < self.end

    def covers_whole_hour(self, hour: int) -> bool:
        """Whether every event of the hour is in the scope, if it is the scope's user's."""
        if self.kind != "range":
            return True
        assert self.start is not None and self.end is not None
        return self.start <= hour and hour + HOUR <= self.end

    def raw_query(self, hour: int) -> dict[str, Any]:
        """The scope's raw events of one hour: an equality on the indexed ``hour`` first."""
        query: dict[str, Any] = {"hour": to_datetime(hour), "account_id": self.account}
        if self.kind == "user":
            query["user_id"] = self.user
        elif self.kind == "range":
            assert self.start is not None and self.end is not None
            if hour < self.start or hour + HOUR > self.end:  # a partial hour at either end
                query["timestamp"] = {"$gte": to_datetime(self.start),
                                      "$lt": to_datetime(self.end)}  # fmt: skip
        return query

    def public(self) -> dict[str, Any]:
        """What records say about the scope: never the user id."""
        facts: dict[str, Any] = {"kind": self.kind, "account": self.account}
        if self.kind == "user":
            facts["user_hash"] = self.user_hash
        if self.kind == "range":
            assert self.start is not None and self.end is not None
            facts["from"], facts["to"] = to_datetime(self.start), to_datetime(self.end)
        return facts


def raw_hours(
    settings: Settings, scope: Scope, now: datetime, oldest: int | None = None
) -> list[int]:
    """The hours whose raw events may hold the scope's: every hour an event can be stored
    in (from ``oldest`` when retention lags behind), those the range reaches."""
    first, last = stored_span(settings, now)
    start, end = ms(first), ms(last)
    if oldest is not None:
        start = min(start, floor(oldest, "hour"))
    return [h for h in range(start, end, HOUR) if scope.covers_hour(h)]


async def oldest_raw_hour(db: Database) -> int | None:
    """Where retention stands on a server without TTL indexes (FerretDB): when it lags,
    raw events older than the raw retention are still there."""
    state = await db[keys.STATE].find_one({"_id": "retention"})
    value = state.get("events") if state else None
    return int(value) if value is not None else None


# ---------------------------------------------------------------------------------------
# Tombstones


@dataclass(frozen=True)
class Tombstone:
    run: str  # the erasure run that set it
    account: str
    kind: Kind
    user_hash: str = ""
    start: int | None = None
    end: int | None = None
    before: int | None = None  # entries queued before this (epoch ms); None: every entry

    @classmethod
    def of(cls, scope: Scope, run: str) -> Tombstone:
        return cls(run, scope.account, scope.kind, scope.user_hash, scope.start, scope.end)

    def encode(self) -> str:
        return json.dumps({"account": self.account, "kind": self.kind, "user": self.user_hash,
                           "from": self.start, "to": self.end})  # fmt: skip

    @classmethod
    def decode(cls, run: str, text: bytes | str, before: bytes | str | None) -> Tombstone:
        facts = json.loads(text)
        return cls(run, facts["account"], facts["kind"], facts.get("user", ""), facts.get("from"),
                   facts.get("to"), int(before) if before is not None else None)  # fmt: skip


@dataclass
class Matcher:
    """The tombstones a flusher checks, by account (an account without one costs a dict
    lookup per event)."""

    version: int = -1
    by_account: dict[str, list[Tombstone]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_account)

    def erases(self, queued_ms: int, account: str, user: str, ts: int) -> Tombstone | None:
        """The tombstone that keeps this event out of the store, if any."""
        rules = self.by_account.get(account)
        if not rules:
            return None
        hashed = ""
        for rule in rules:
            if rule.before is not None and queued_ms >= rule.before:
                continue  # queued after that erasure finished: a new event
            if rule.kind == "account":
                return rule
            if rule.kind == "range":
                assert rule.start is not None and rule.end is not None
                if rule.start <= ts < rule.end:
                    return rule
                continue
            hashed = hashed or user_hash(account, user)
            if hashed == rule.user_hash:
                return rule
        return None


def queued_ms(entry_id: bytes | str) -> int:
    """When a stream entry was queued: the milliseconds of its id (the Redis clock)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


# KEYS: tombstones; ARGV: run, tombstone. Set (or set again) a running erasure's tombstone.
_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1] .. ':before')
return redis.call('HINCRBY', KEYS[1], 'v', 1)
"""

# KEYS: tombstones; ARGV: run. The erasure finished: from now on the tombstone matches only
# entries queued before now (the Redis clock, read in the same script as it is set).
_FINISH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
local now = redis.call('TIME')
local before = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('HSET', KEYS[1], ARGV[1] .. ':before', before)
redis.call('HINCRBY', KEYS[1], 'v', 1)
return before
"""

# KEYS: tombstones; ARGV: run, before. Drop a finished tombstone (still as it was checked).
_DROP = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':before') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. ':before')
redis.call('HINCRBY', KEYS[1], 'v', 1)
return 1
"""


async def put_tombstone(redis: Redis, settings: Settings, tombstone: Tombstone) -> None:
    await redis.eval(_PUT, 1, keys.erasure_tombstones(settings), tombstone.run,
                     tombstone.encode())  # fmt: skip


async def finish_tombstone(redis: Redis, settings: Settings, run: str) -> int | None:
    """Narrow the run's tombstone to entries queued before now; that moment (epoch ms)."""
    before = await redis.eval(_FINISH, 1, keys.erasure_tombstones(settings), run)
    return int(before) if before is not None else None


def parse_tombstones(raw: dict[bytes, bytes]) -> Matcher:
    version = int(raw.get(VERSION_FIELD.encode(), b"0"))
    matcher = Matcher(version)
    for name, value in raw.items():
        run = name.decode()
        if run == VERSION_FIELD or run.endswith(BEFORE_SUFFIX):
            continue
        tombstone = Tombstone.decode(run, value, raw.get(f"{run}{BEFORE_SUFFIX}".encode()))
        matcher.by_account.setdefault(tombstone.account, []).append(tombstone)
    return matcher


async def tombstones(redis: Redis, settings: Settings) -> list[Tombstone]:
    raw: Any = await redis.hgetall(keys.erasure_tombstones(settings))
    return [t for rules in parse_tombstones(raw).by_account.values() for t in rules]


class TombstoneReader:
    """A flusher's view of the tombstones: one HGET of the version per flush, the whole
    hash only when it moved. Read after the flush's entries were delivered, so an entry
    delivered after a tombstone was set is always checked against it."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._key = keys.erasure_tombstones(settings)
        self._dropped_key = keys.erasure_dropped(settings)
        self._matcher = Matcher()

    async def current(self) -> Matcher:
        version: Any = await self._redis.hget(self._key, VERSION_FIELD)
        number = int(version) if version is not None else 0
        if number != self._matcher.version:
            raw: Any = await self._redis.hgetall(self._key)
            self._matcher = parse_tombstones(raw)
            self._matcher.version = number
        return self._matcher

    async def count_dropped(self, per_run: dict[str, int]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for run, n in per_run.items():
                pipe.hincrby(self._dropped_key, run, n)
            await pipe.execute()


async def prune_tombstones(db: Database, redis: Redis, settings: Settings) -> int:
    """Drop the finished tombstones nothing in the queue can match any more: every stream
    partition's oldest entry was queued after the erasure finished. The queued events each
    kept out of the store are then final, and go into its audit record. How many went."""
    found = [t for t in await tombstones(redis, settings) if t.before is not None]
    if not found:
        return 0
    oldest: int | None = None  # the oldest entry still in any partition's stream
    for part in keys.partitions(settings):
        first: Any = await redis.xrange(part.stream, "-", "+", count=1)
        if first:
            queued = queued_ms(first[0][0])
            oldest = queued if oldest is None else min(oldest, queued)
    dropped_key = keys.erasure_dropped(settings)
    pruned = 0
    for tombstone in found:
        assert tombstone.before is not None
        if oldest is not None and oldest < tombstone.before:
            continue
        if not await redis.eval(_DROP, 1, keys.erasure_tombstones(settings), tombstone.run,
                                str(tombstone.before)):  # fmt: skip
            continue
        count: Any = await redis.hget(dropped_key, tombstone.run)
        final = {"queued_dropped": int(count or 0), "tombstone_dropped_at": datetime.now(UTC)}
        await db[keys.ERASURE_AUDIT].update_one({"_id": tombstone.run}, {"$set": final})
        await redis.hdel(dropped_key, tombstone.run)
        pruned += 1
    return pruned


async def dropped_so_far(db: Database, redis: Redis, settings: Settings, run: str) -> int:
    """Queued events the run's tombstone kept out of the store: final in its audit record
    once the tombstone is gone, else counted so far."""
    record = await db[keys.ERASURE_AUDIT].find_one({"_id": run}, {"queued_dropped": 1})
    if record is not None and "queued_dropped" in record:
        return int(record["queued_dropped"])
    found: Any = await redis.hget(keys.erasure_dropped(settings), run)
    return int(found or 0)


# ---------------------------------------------------------------------------------------
# Taking the scope's events out of Redis: live tails and dead letters

# Rewrite a stream with no consumer group keeping every entry's id (a tail: readers and
# heads name entries by id). KEYS: the stream; ARGV: pairs of an entry id and what replaces
# its 'e' field ("" deletes the entry). Entries not named stay as they are. The stream's
# last id is kept, so later entries still get greater ids; a stream left empty is deleted,
# as a rollover's trim does.
_REWRITE_TAIL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local changes = {}
for i = 1, #ARGV, 2 do changes[ARGV[i]] = ARGV[i + 1] end
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
redis.call('DEL', KEYS[1])
local kept = 0
for _, entry in ipairs(entries) do
  local id, fields = entry[1], entry[2]
  local new = changes[id]
  if new == nil then
    redis.call('XADD', KEYS[1], id, unpack(fields))
    kept = kept + 1
  elseif new ~= '' then
    redis.call('XADD', KEYS[1], id, 'e', new)
    kept = kept + 1
  end
end
if kept > 0 then redis.call('XSETID', KEYS[1], last) end
return kept
"""


def without(events: TailEvents, scope: Scope, account: str) -> tuple[TailEvents, int]:
    """The tail events the scope does not hold, and how many it does."""
    kept = TailEvents([], [], [])
    for ts, event_type, user in zip(events.ts, events.types, events.users, strict=True):
        if not scope.matches(account, user, ts):
            kept.ts.append(ts)
            kept.types.append(event_type)
            kept.users.append(user)
    return kept, len(events.ts) - len(kept.ts)


async def scrub_tails(redis: Redis, settings: Settings, scope: Scope) -> int:
    """Take the scope's events out of the account's live tail in every partition, entry
    ids kept; how many. Entries added meanwhile hold none of them (the tombstone)."""
    removed = 0
    for part in keys.partitions(settings):
        key = part.tail(scope.account)
        reply: Any = await redis.xrange(key, "-", "+")
        entries: Sequence[TailEntry] = parse_entries(part.index, reply)
        changes: list[str | bytes] = []
        for entry in entries:
            kept, gone = without(entry.events, scope, scope.account)
            if gone:
                removed += gone
                changes += [f"{entry.entry_id[0]}-{entry.entry_id[1]}",
                            encode(kept) if kept.ts else ""]  # fmt: skip
        if changes:
            await redis.eval(_REWRITE_TAIL, 1, key, *changes)
    return removed


async def drop_tails(redis: Redis, settings: Settings, account: str) -> None:
    """The whole account's live tail, in every partition."""
    rollup_partition = keys.rollup_partition_of(settings, account)
    for part in keys.partitions(settings):
        await redis.delete(part.tail(account))
        await redis.srem(keys.dirty_set(settings, part, rollup_partition), account)
    await redis.zrem(keys.rollup_schedule(settings, rollup_partition), account)


# Replace a dead letter's body without the erased events (it moves to the end of the
# dead-letter stream, under a new id), or delete it when none is left.
# KEYS: dead-letter stream; ARGV: id, new body ("" deletes), new count, new accounts
_REPLACE_DEAD = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[1])
if ARGV[2] == '' then return '' end
local fields = found[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'body' then fields[i + 1] = ARGV[2] end
  if fields[i] == 'count' then fields[i + 1] = ARGV[3] end
  if fields[i] == 'accounts' then fields[i + 1] = ARGV[4] end
end
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""
DEAD_PAGE = 100


async def scrub_dead_letters(redis: Redis, settings: Settings, scope: Scope) -> int:
    """Take the scope's events out of every dead letter (a replay would store them); how
    many. A dead letter whose body cannot be decoded is left as it is (drop it)."""
    removed = 0
    for part in keys.partitions(settings):
        low = "-"
        changes: list[tuple[bytes, bytes, int, str]] = []
        while True:
            page: Any = await redis.xrange(part.dead, low, "+", count=DEAD_PAGE)
            for entry_id, fields in page:
                try:
                    events = decode_events(fields.get(b"body", b""))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                kept = [e for e in events
                        if not scope.matches(e.account_id, e.user_id, ms(e.timestamp))]  # fmt: skip
                if len(kept) < len(events):
                    removed += len(events) - len(kept)
                    accounts = ",".join(sorted({e.account_id for e in kept}))
                    changes.append((entry_id, encode_events(kept) if kept else b"", len(kept),
                                    accounts))  # fmt: skip
            if len(page) < DEAD_PAGE:
                break
            low = f"({page[-1][0].decode()}"
        for entry_id, body, count, accounts in changes:
            await redis.eval(_REPLACE_DEAD, 1, part.dead, entry_id, body, count, accounts)
    return removed


# ---------------------------------------------------------------------------------------
# Jobs and audit records (MongoDB)

RUNNING, DONE, FAILED = "running", "done", "failed"
SCOPE_FIELDS = ("kind", "account", "user_hash", "from", "to")


@dataclass
class Job:
    """One erasure scope's job: its current run and progress."""

    id: str
    scope: dict[str, Any]  # Scope.public(): no user id
    run: int
    state: str = RUNNING
    step: str = "starting"
    corrected: bool = False  # the run's corrections are in the rollups
    hours_total: int = 0
    hours_done: int = 0
    deleted_through: int | None = None  # raw events deleted through this hour (epoch ms)
    events: int = 0  # raw events deleted
    rollup_events: int = 0  # taken out of the rollups (buckets, aggregates)
    tail_events: int = 0  # taken out of the live tail
    dead_letter_events: int = 0
    by: str = ""
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str = ""

    @property
    def run_id(self) -> str:
        return f"{self.id}#{self.run}"

    @property
    def account(self) -> str:
        return str(self.scope["account"])

    def document(self) -> Document:
        return {"_id": self.id, **self.scope, "run": self.run, "run_id": self.run_id,
                "state": self.state, "step": self.step, "corrected": self.corrected,
                "hours_total": self.hours_total, "hours_done": self.hours_done,
                "deleted_through": self.deleted_through, "events": self.events,
                "rollup_events": self.rollup_events, "tail_events": self.tail_events,
                "dead_letter_events": self.dead_letter_events, "by": self.by,
                "requested_at": self.requested_at, "started_at": self.started_at,
                "updated_at": datetime.now(UTC), "finished_at": self.finished_at,
                "error": self.error}  # fmt: skip

    @classmethod
    def from_document(cls, doc: Document) -> Job:
        scope: dict[str, Any] = {k: doc[k] for k in SCOPE_FIELDS if k in doc}
        return cls(id=doc["_id"], scope=scope, run=int(doc["run"]), state=doc["state"],
                   step=doc.get("step", ""), corrected=bool(doc.get("corrected")),
                   hours_total=int(doc.get("hours_total", 0)),
                   hours_done=int(doc.get("hours_done", 0)),
                   deleted_through=doc.get("deleted_through"), events=int(doc.get("events", 0)),
                   rollup_events=int(doc.get("rollup_events", 0)),
                   tail_events=int(doc.get("tail_events", 0)),
                   dead_letter_events=int(doc.get("dead_letter_events", 0)),
                   by=doc.get("by", ""), requested_at=doc.get("requested_at"),
                   started_at=doc.get("started_at"), finished_at=doc.get("finished_at"),
                   error=doc.get("error", ""))  # fmt: skip

    def public(self, queued_dropped: int | None = None) -> dict[str, Any]:
        """What the API and the CLI show (no user id: the scope names a user by its hash)."""
        facts = {"id": self.id, **{k: iso(v) for k, v in self.scope.items()}, "run": self.run,
                 "state": self.state, "step": self.step, "events": self.events,
                 "rollup_events": self.rollup_events, "tail_events": self.tail_events,
                 "dead_letter_events": self.dead_letter_events,
                 "hours_done": self.hours_done, "hours_total": self.hours_total,
                 "by": self.by, "requested_at": iso(self.requested_at),
                 "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                 "error": self.error or None}  # fmt: skip
        if queued_dropped is not None:
            facts["queued_dropped"] = queued_dropped
        return facts


def iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


async def open_job(db: Database, scope: Scope, by: str) -> Job:
    """The scope's job: resumed when a run is unfinished, else a new run (the first, or
    one more after a finished one: it erases what came since, or nothing)."""
    now = datetime.now(UTC)
    found = await db[keys.ERASURES].find_one({"_id": scope.job_id})
    if found is not None and found["state"] != DONE:
        job = Job.from_document(found)
        job.state, job.error, job.by = RUNNING, "", by
    else:
        run = int(found["run"]) + 1 if found is not None else 1
        job = Job(scope.job_id, scope.public(), run, by=by, requested_at=now, started_at=now)
    await save_job(db, job)
    await db[keys.ERASURE_AUDIT].update_one(
        {"_id": job.run_id},
        {"$setOnInsert": {**scope.public(), "job": job.id, "run": job.run, "by": by,
                          "requested_at": job.requested_at, "done": False}},
        upsert=True,
    )  # fmt: skip
    return job


async def save_job(db: Database, job: Job) -> None:
    await db[keys.ERASURES].replace_one({"_id": job.id}, job.document(), upsert=True)


async def fail_job(db: Database, job: Job, error: str) -> None:
    job.state, job.error = FAILED, error[:1000]
    await save_job(db, job)


async def finish_job(db: Database, job: Job, finished_at: datetime | None = None) -> None:
    """Record the job done; ``finished_at`` is the moment its tombstone was narrowed to (the
    scope's events queued before it are erased, those queued after are kept)."""
    job.state, job.step = DONE, "done"
    job.finished_at = finished_at or datetime.now(UTC)
    await save_job(db, job)
    await db[keys.ERASURE_AUDIT].update_one(
        {"_id": job.run_id},
        {"$set": {"done": True, "finished_at": job.finished_at, "events": job.events,
                  "rollup_events": job.rollup_events, "tail_events": job.tail_events,
                  "dead_letter_events": job.dead_letter_events}},
    )  # fmt: skip


async def settle_corrected(db: Database, account: str, head_erasure: str) -> None:
    """The run named by the account's head has its corrections in the rollups, whether or
    not it lived to record that (a crash right after publishing them)."""
    if head_erasure:
        await db[keys.ERASURES].update_one(
            {"account": account, "run_id": head_erasure}, {"$set": {"corrected": True}}
        )


async def find_job(db: Database, job_id: str) -> Job | None:
    found = await db[keys.ERASURES].find_one({"_id": job_id})
    return Job.from_document(found) if found else None


async def jobs(db: Database, account: str | None = None, limit: int = 100) -> list[Job]:
    query = {"account": account} if account else {}
    found = db[keys.ERASURES].find(query, sort=[("updated_at", -1)], limit=limit)
    return [Job.from_document(doc) async for doc in found]


async def audit_records(db: Database, account: str | None = None,
                        limit: int = 100) -> list[Document]:  # fmt: skip
    query = {"account": account} if account else {}
    found = db[keys.ERASURE_AUDIT].find(query, sort=[("requested_at", -1)], limit=limit)
    return [doc async for doc in found]


def describe_hours(hours: Iterable[int]) -> str:
    listed = sorted(hours)
    if not listed:
        return "no hour"
    first, last = to_datetime(listed[0]), to_datetime(listed[-1]) + timedelta(hours=1)
    return f"{len(listed)} hours, {first:%Y-%m-%dT%H}:00Z..{last:%Y-%m-%dT%H}:00Z"
