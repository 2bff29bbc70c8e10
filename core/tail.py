"""The live tail: each account's stored events that are not in its window aggregates yet.

When a flusher acknowledges stream entries it appends, in the same atomic
Redis script, one tail entry per account holding exactly the events those
entries newly stored (re-sent duplicates excluded). So the tail is
the exact, ordered record of what became visible in MongoDB, and:

- ``GET /summary`` adds the tail events its window covers to the account's
  window aggregate (``core/rollup_docs.py``): exact up to the moment it read
  the tail, whatever the rollup job is doing;
- the rollup job folds tail events into buckets and aggregates once a minute,
  then drops the entries it no longer needs.

Tail keys live in the stream partition of the batch that wrote them, so an
account may have a tail in several partitions; readers read all of them.
Entry ids (``ms-seq``) order entries within one partition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from core.keys import Partition

StreamId = tuple[int, int]
ZERO_ID: StreamId = (0, 0)


class TailEvents(msgspec.Struct, array_like=True, gc=False):
    """One batch's newly stored events of one account, as parallel lists."""

    ts: list[int]  # epoch ms
    types: list[str]
    users: list[str]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TailEvents)


def encode(events: TailEvents) -> bytes:
    return _encoder.encode(events)


def decode(blob: bytes) -> TailEvents:
    return _decoder.decode(blob)


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    left, _, right = text.partition("-")
    return int(left), int(right or 0)


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


@dataclass(frozen=True)
class TailEntry:
    partition: int
    entry_id: StreamId
    events: TailEvents

    @property
    def newest(self) -> int:
        return max(self.events.ts)


def parse_entries(partition: int, reply: Sequence[Any]) -> list[TailEntry]:
    """Entries of an XRANGE reply."""
    out: list[TailEntry] = []
    for entry_id, fields in reply:
        if isinstance(fields, list):  # from a Lua script: a flat field/value list
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        blob = fields.get(b"e")
        if blob is None:
            continue
        out.append(TailEntry(partition, parse_id(entry_id), _decoder.decode(blob)))
    return out


# One partition's tail of an account from an id on ("-": all of it; "(ms-seq": what
# came after that entry), at most ARGV[2] entries of it, with the server's clock at
# the moment it was read, and (KEYS[2], if given) the copy of the account's head,
# "" if none. A script, because a Redis Cluster pipeline refuses a bare TIME, and
# atomic: the head copy is never older than the entries read with it.
_READ = """
local out = {redis.call('TIME'), redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
if KEYS[2] then out[3] = redis.call('HGET', KEYS[2], 'h') or '' end
return out
"""
# entries per read: a tail that grew long (rollups stalled) is read in calls this size,
# never in one call that would hold Redis up for every other client
READ_CHUNK = 1000


@dataclass
class TailRead:
    to: int  # the Redis clock when it was read
    entries: list[TailEntry]
    head: bytes | None = None  # the head copy (``Head.copy``), if asked for and kept


async def read_tails(
    client: Any,
    parts: Sequence[Partition],
    account_id: str,
    after: Mapping[int, StreamId] | None = None,
    head_key: str | None = None,
    chunk: int = READ_CHUNK,
) -> TailRead:
    """The account's tail in every partition (only entries newer than ``after``, when
    given), the clock when it was read, and the head copy at ``head_key`` read no
    earlier than the tail.

    A tail longer than ``chunk`` entries is read in several calls. The head copy is
    then read again after the last one: a rollover between two calls may have
    trimmed entries not read yet, and only a head at least that new counts them.
    The clock is that of the last call, so every entry read was stored before it.
    With several partitions (on several cluster nodes) the earliest of their clocks
    is returned: every event acknowledged before it is in the entries.
    """
    after = after or {}
    together = head_key is not None and len(parts) == 1  # one call: the same instant

    def since(part: Partition, newer: StreamId | None) -> str:
        return f"({format_id(newer)}" if newer else "-"

    if together:
        [part] = parts
        replies = [await client.eval(_READ, 2, part.tail(account_id), head_key,
                                     since(part, after.get(part.index)), chunk)]  # fmt: skip
    else:
        async with client.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.eval(_READ, 1, part.tail(account_id), since(part, after.get(part.index)),
                          chunk)  # fmt: skip
            replies = await pipe.execute()
    entries: list[TailEntry] = []
    clocks: list[int] = []
    read_more = False
    for part, reply in zip(parts, replies, strict=True):
        found = parse_entries(part.index, reply[1])
        clock = redis_time_ms(reply[0])
        while len(found) == chunk:  # a long tail: the rest, a chunk at a time
            read_more = True
            entries.extend(found)
            more = await client.eval(_READ, 1, part.tail(account_id),
                                     since(part, found[-1].entry_id), chunk)  # fmt: skip
            found, clock = parse_entries(part.index, more[1]), redis_time_ms(more[0])
        entries.extend(found)
        clocks.append(clock)
    to = min(clocks)
    if head_key is None:
        return TailRead(to, entries)
    # several partitions may be on several nodes, or the tail took several calls: the
    # head is read after every entry
    if together and not read_more:
        head = replies[0][2]
    else:
        head = await client.hget(head_key, "h")
    return TailRead(to, entries, head or None)


TAILS_PER_CALL = 500  # accounts' tails per script call of read_many_tails

# Many tails of one partition (one slot), at most ARGV[1] entries of each.
_READ_MANY = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('XRANGE', KEYS[i], '-', '+', 'COUNT', ARGV[1]) end
return out
"""


async def read_many_tails(
    client: Any, parts: Sequence[Partition], accounts: Sequence[str], chunk: int = READ_CHUNK
) -> dict[str, list[TailEntry]]:
    """Many accounts' tails in every partition: per partition, one script call for up to
    ``TAILS_PER_CALL`` accounts, pipelined (a tail longer than ``chunk`` entries is read
    on, a chunk at a time). For a rollover, which needs no clock nor head copy with
    them: an entry is trimmed only by a rollover whose head applied it."""
    out: dict[str, list[TailEntry]] = {}
    for start in range(0, len(accounts), TAILS_PER_CALL):
        some = accounts[start : start + TAILS_PER_CALL]
        async with client.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.eval(_READ_MANY, len(some), *(part.tail(a) for a in some), chunk)
            replies = [iter(reply) for reply in await pipe.execute()]
        for account in some:
            entries = out[account] = []
            for part, reply in zip(parts, replies, strict=True):
                found = parse_entries(part.index, next(reply))
                while len(found) == chunk:  # a long tail: the rest, a chunk at a time
                    entries.extend(found)
                    after = f"({format_id(found[-1].entry_id)}"
                    found = parse_entries(part.index,
                                          await client.xrange(part.tail(account), after, "+",
                                                              count=chunk))  # fmt: skip
                entries.extend(found)
    return out


def redis_time_ms(reply: Sequence[Any]) -> int:
    """The Redis server's clock (TIME): the one clock every process of the service shares."""
    seconds, micros = int(reply[0]), int(reply[1])
    return seconds * 1000 + micros // 1000


def last_ids(
    entries: Sequence[TailEntry], before: Mapping[int, StreamId] | None = None
) -> dict[int, StreamId]:
    """The newest entry id per partition (of ``before`` and then ``entries``)."""
    out: dict[int, StreamId] = dict(before or {})
    for entry in entries:
        if entry.entry_id > out.get(entry.partition, ZERO_ID):
            out[entry.partition] = entry.entry_id
    return out
