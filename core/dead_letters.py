"""Dead letters: stream entries the flusher could not store, kept to be looked at,
replayed or dropped.

After ``DEAD_LETTER_AFTER`` failed attempts (or at once, for a body that cannot
be decoded) the flusher moves an entry to its partition's dead-letter stream
(``{tag}:dead``), in the same atomic script that acknowledges it
(``service/queue.py``). The dead-letter entry keeps the batch as it was queued
(``count``, ``body``) and why it failed: ``reason``, ``attempts``,
``first_failure`` / ``last_failure`` (epoch ms), ``stored`` (how many of its
events it had stored before giving up: they stay stored and counted), its
``accounts`` and ``source_id`` (its id in the ingest stream).

A dead letter is named ``<partition>:<entry id>`` (``0:1764148500000-0``).

- **replay** moves it back into the ingest stream and its depth counter and
  removes it from the dead-letter stream, in one Redis script: it is then
  either a dead letter or queued, never both nor neither. The flusher's write
  is idempotent on ``_id`` and counts only the events it newly stores, so an
  entry that was partly stored before is stored and counted exactly once.
- **drop** deletes it, after recording who (the API key's id, or the command
  line's ``cli:uid=…``), when, why (the reason given) and how many events in the
  ``dead_letter_audit`` collection: ids, counts and times only, never the
  events themselves (they hold user ids and metadata). Replays are recorded
  the same way. A record is written before the action and marked ``done``
  after it (see :func:`_record`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from pymongo import DESCENDING

from core import keys
from core.api_keys import ALL_ACCOUNTS
from core.connections import Redis
from core.events import decode_events
from core.keys import Partition
from core.settings import Settings
from core.store import Database

MAX_PAGE = 100
# entries looked at per listing request (the filter may skip many)
MAX_SCANNED = 2_000
MAX_REASON = 500
UNKNOWN_ACCOUNTS = [ALL_ACCOUNTS]  # an undecodable body: only a key for every account
_ID = re.compile(r"^(\d{1,6}):(\d{1,20}-\d{1,20})$")

# Move a dead letter back into the ingest stream, atomically.
# KEYS: dead-letter stream, ingest stream, depth counter; ARGV: dead-letter id
# returns the new ingest-stream entry id, or false when there is no such dead letter
_REPLAY = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields = found[1][2]
local count, body
for i = 1, #fields, 2 do
  if fields[i] == 'count' then count = fields[i + 1] end
  if fields[i] == 'body' then body = fields[i + 1] end
end
local id = redis.call('XADD', KEYS[2], '*', 'count', count, 'body', body)
redis.call('INCRBY', KEYS[3], count)
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


class DeadLetterError(ValueError):
    """A request about dead letters that cannot be done (bad id, no such entry, …)."""


class NotFound(DeadLetterError):
    pass


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered stream entry."""

    id: str
    partition: int
    count: int
    body: bytes
    reason: str
    source_id: str
    accounts: list[str]
    # None for entries dead-lettered before these were recorded
    attempts: int | None
    first_failure: datetime | None
    last_failure: datetime | None
    stored: int | None

    @property
    def dead_lettered_at(self) -> datetime:
        return ms_time(int(self.id.split(":")[1].split("-")[0]))

    def public(self) -> dict[str, Any]:
        """What a listing shows: everything but the events."""
        return {
            "id": self.id,
            "partition": self.partition,
            "events": self.count,
            "accounts": self.accounts,
            "reason": self.reason,
            "attempts": self.attempts,
            "first_failure": rfc3339(self.first_failure),
            "last_failure": rfc3339(self.last_failure),
            "dead_lettered_at": rfc3339(self.dead_lettered_at),
            "stored_before": self.stored,
            "source_id": self.source_id,
        }

    def shown(self) -> dict[str, Any]:
        """With its events as POST /events takes them, or its raw body if it is not JSON."""
        try:
            batch = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return self.public() | {"batch": None, "body": self.body.decode("utf-8", "replace")}
        return self.public() | {"batch": batch}

    @property
    def replayable(self) -> bool:
        """Whether the flusher could decode it: an undecodable body would only come back."""
        try:
            decode_events(self.body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return True


def rfc3339(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_time(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def accounts_of_body(body: bytes) -> list[str]:
    try:
        return sorted({e.account_id for e in decode_events(body)}) or UNKNOWN_ACCOUNTS
    except (msgspec.DecodeError, msgspec.ValidationError):
        return UNKNOWN_ACCOUNTS


def parse(partition: int, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str | None:
        value = fields.get(name.encode())
        return value.decode() if value is not None else None

    def number(name: str) -> int | None:
        value = text(name)
        return int(value) if value not in (None, "", "0") else None

    accounts = text("accounts")
    first, last = number("first_failure"), number("last_failure")
    return DeadLetter(
        id=f"{partition}:{entry_id.decode()}",
        partition=partition,
        count=int(fields.get(b"count", b"0")),
        body=fields.get(b"body", b""),
        reason=text("reason") or "",
        source_id=text("source_id") or "",
        accounts=accounts.split(",") if accounts else accounts_of_body(fields.get(b"body", b"")),
        attempts=number("attempts"),
        first_failure=ms_time(first) if first else None,
        last_failure=ms_time(last) if last else None,
        stored=int(fields[b"stored"]) if b"stored" in fields else None,
    )


def locate(settings: Settings, dead_id: str) -> tuple[Partition, str]:
    """The partition and dead-letter stream id a dead letter's name points at."""
    match = _ID.match(dead_id)
    if not match:
        raise DeadLetterError(
            f"{dead_id!r} is not a dead letter id: they look like 0:1764148500000-0 "
            "(partition:entry id, as listed)"
        )
    index = int(match[1])
    if index >= settings.stream_partitions:
        raise NotFound(f"no dead letter {dead_id}: there are {settings.stream_partitions} "
                       "partitions")  # fmt: skip
    return keys.partitions(settings)[index], match[2]


async def get(redis: Redis, settings: Settings, dead_id: str) -> DeadLetter:
    part, entry_id = locate(settings, dead_id)
    found: Any = await redis.xrange(part.dead, entry_id, entry_id)
    if not found:
        raise NotFound(f"no dead letter {dead_id} (replayed or dropped already?)")
    return parse(part.index, *found[0])


async def page(
    redis: Redis,
    settings: Settings,
    *,
    after: str | None = None,
    limit: int = 20,
    account: str | None = None,
    allowed: Callable[[Sequence[str]], bool] = lambda accounts: True,
) -> tuple[list[DeadLetter], str | None]:
    """Dead letters in order (partition, then age), after ``after``; and where the next
    page starts (None at the end). ``account`` and ``allowed`` filter them."""
    if not 1 <= limit <= MAX_PAGE:
        raise DeadLetterError(f"limit must be 1..{MAX_PAGE}")
    parts = keys.partitions(settings)
    start_part, start_id = 0, "-"
    if after:
        part, entry_id = locate(settings, after)
        start_part, start_id = part.index, f"({entry_id}"
    out: list[DeadLetter] = []
    scanned = 0
    for part in parts[start_part:]:
        low = start_id if part.index == start_part else "-"
        while True:
            batch: Any = await redis.xrange(part.dead, low, "+", count=min(limit, MAX_PAGE))
            for entry_id, fields in batch:
                scanned += 1
                letter = parse(part.index, entry_id, fields)
                if (account is None or account in letter.accounts) and allowed(letter.accounts):
                    out.append(letter)
                last = letter.id
                if len(out) == limit or scanned >= MAX_SCANNED:
                    return out, await _next(redis, parts, last)
            if len(batch) < min(limit, MAX_PAGE):
                break
            low = f"({batch[-1][0].decode()}"
    return out, None


async def _next(redis: Redis, parts: list[Partition], last: str) -> str | None:
    """``last`` as the cursor of the next page, or None when nothing comes after it."""
    index, entry_id = int(last.split(":")[0]), last.split(":")[1]
    if await redis.xrange(parts[index].dead, f"({entry_id}", "+", count=1):
        return last
    for part in parts[index + 1 :]:
        if await redis.xlen(part.dead):
            return last
    return None


async def count(redis: Redis, settings: Settings) -> int:
    return sum([int(await redis.xlen(p.dead)) for p in keys.partitions(settings)])


def audit(db: Database) -> Any:
    return db[keys.DEAD_LETTER_AUDIT]


async def audit_records(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    found = audit(db).find({}, sort=[("at", DESCENDING)], limit=limit)
    return [d async for d in found]


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not 1 <= len(reason) <= MAX_REASON:
        raise DeadLetterError(f"give a reason of 1..{MAX_REASON} characters: it is recorded")
    return reason


async def _record(db: Database, letter: DeadLetter, action: str, by: str, reason: str) -> Any:
    """Record an action before doing it (``done: false``); the record's id.

    Each attempt has its own record, marked done once the action happened, and
    deleted if the dead letter was gone by then (replayed or dropped meanwhile).
    A record left ``done: false`` belongs to a process that died in between.
    """
    record = {
        "action": action,
        "dead_letter": letter.id,
        "partition": letter.partition,
        "source_id": letter.source_id,
        "accounts": letter.accounts,
        "events": letter.count,
        "attempts": letter.attempts,
        "first_failure": letter.first_failure,
        "last_failure": letter.last_failure,
        "by": by,
        "reason": reason,
        "at": datetime.now(UTC),
        "done": False,
    }
    return (await audit(db).insert_one(record)).inserted_id


async def replay(
    db: Database, redis: Redis, settings: Settings, letter: DeadLetter, by: str, reason: str = ""
) -> str:
    """Queue it again (atomically with removing it); the new ingest-stream entry id."""
    if not letter.replayable:
        raise DeadLetterError(
            f"dead letter {letter.id} is not a batch the flusher can decode "
            f"({letter.reason}); replaying it would only dead-letter it again: drop it"
        )
    if len(reason) > MAX_REASON:
        raise DeadLetterError(f"the reason may be at most {MAX_REASON} characters")
    record_id = await _record(db, letter, "replay", by, reason.strip())
    part, entry_id = locate(settings, letter.id)
    new_id = await redis.eval(_REPLAY, 3, part.dead, part.stream, part.depth, entry_id)
    if new_id is None:
        await audit(db).delete_one({"_id": record_id})
        raise NotFound(f"no dead letter {letter.id} (replayed or dropped meanwhile?)")
    entry = _text(new_id)
    await audit(db).update_one({"_id": record_id}, {"$set": {"done": True, "entry": entry}})
    return entry


async def drop(
    db: Database, redis: Redis, settings: Settings, letter: DeadLetter, by: str, reason: str
) -> None:
    """Delete it for good, once the audit record says who, when, why and how many."""
    reason = check_reason(reason)
    record_id = await _record(db, letter, "drop", by, reason)
    part, entry_id = locate(settings, letter.id)
    if not await redis.xdel(part.dead, entry_id):
        await audit(db).delete_one({"_id": record_id})
        raise NotFound(f"no dead letter {letter.id} (replayed or dropped meanwhile?)")
    await audit(db).update_one({"_id": record_id}, {"$set": {"done": True}})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
