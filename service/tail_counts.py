"""Each HTTP worker's running counts of accounts' live tails: a summary reads only what is new.

The tail itself (what it holds, how it is read) is ``core/tail.py``; this module
holds what one worker has counted of it.

An account's tail holds every batch stored since its last rollover. Under
``make k6-load`` (20 accounts, ~110 small batches a second) that is thousands
of one-event entries by the end of a minute, and reading and counting all of
them for every summary took ~70% of an HTTP worker's CPU and put /summary's
p95 near a second (py-spy, docs/PROFILE.md). Entries are only ever appended,
with growing ids, and what a summary counts from them depends only on the
head it read and where the window starts (its *basis*). So a worker keeps,
per account and window, what it counted at its last summary, reads only the
entries appended since (``core.tail.read_tails(after=…)``), and counts the
whole tail again only when the basis moves: about once a minute.

Why it stays exact: a running count for basis B at clock ``to`` holds the
events of the entries up to ``last`` that B's head does not hold, with
timestamps in ``[start, to)``; the ones at or after ``to`` (clients may send
timestamps up to 5 minutes ahead) wait in ``later``. Advancing it to a later
clock with the entries read after ``last`` under the same basis gives what
counting the whole tail would: old entries are classified by the same head
and start, waiting events count once the clock passes them, new entries are
counted alone. The rollup job trims tail entries only after writing a newer
head, and a summary reads the tail before the head, so a summary that could
miss a trimmed entry sees a new head, hence a new basis, and counts afresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from cachetools import LRUCache

from core.buckets import Counts
from core.rollup_docs import Head
from core.tail import StreamId, TailEntry, last_ids

NONE_HELD = -(2**63)  # below every timestamp
ALL_HELD = 2**63  # above every timestamp
KEPT_COUNTS = 10_000  # (account, window) pairs per worker; least recently used go first

Event = tuple[int, str, str]  # timestamp, type, user


@dataclass(frozen=True)
class Basis:
    """What a count of the tail depends on besides the entries: the minute of the head it
    was made under (None: no head yet) and where the window starts.

    Within a minute the rollup job writes a new head whenever late events (from
    an earlier minute) arrive: the new head applies more entries and holds
    their events before its minute. A running count follows that without
    starting again (``Running.provisional``); a head of another minute, or
    another window start, or one after an erasure, needs a fresh count.
    """

    head_minute: int | None
    has_head: bool
    start: int
    # erasures applied to the account: an erasure takes events out of the tail as well
    # as out of the documents, so a count made before it must not be carried on
    erased: int = 0

    @classmethod
    def of(cls, head: Head | None, start: int) -> Basis:
        if head is None:
            return cls(None, False, start)
        return cls(head.minute, True, start, head.erased)


def held_before(entry: TailEntry, head: Head | None) -> int:
    """The entry's events timestamped before this are in the head's documents; later ones
    are not, so they count from the tail.

    The head's documents hold the events before its minute of every entry it
    applied, and nothing of the entries it has not applied yet.
    """
    if head is None or entry.entry_id > head.applied_id(entry.partition):
        return NONE_HELD
    return head.minute if head.minute is not None else ALL_HELD


@dataclass
class Provisional:
    """Events counted from an entry the head had not applied, timestamped before its
    minute: a later head of the same minute that applies the entry holds them."""

    partition: int
    entry_id: StreamId
    events: list[Event]


@dataclass
class Running:
    """The tail of one account counted for one window under one basis, as of ``to``."""

    basis: Basis
    version: int  # of the head it was last counted under (0: none)
    to: int
    last: dict[int, StreamId]  # the newest entry counted, per partition
    counts: Counts = field(default_factory=Counts)  # in [start, to), not held by the head
    later: list[Event] = field(default_factory=list)  # not held, at or after ``to``
    provisional: list[Provisional] = field(default_factory=list)
    events_read: int = 0  # tail events this count had to read

    @classmethod
    def count(
        cls, basis: Basis, head: Head | None, entries: Sequence[TailEntry], to: int
    ) -> Running:
        running = cls(basis, _version(head), to, last_ids(entries))
        running._add(entries, head)
        return running

    def continues(self, basis: Basis, head: Head | None, to: int) -> bool:
        """Whether entries read at ``to``, then ``head``, can be added to this count."""
        return basis == self.basis and to >= self.to and _version(head) >= self.version

    def advanced(self, head: Head | None, entries: Sequence[TailEntry], to: int) -> Running:
        """This count moved on to ``to`` and ``head`` with the entries appended since (self
        is unchanged)."""
        counts, later, provisional = self.counts.copy(), [], []
        for ts, event_type, user in self.later:
            if ts < to:
                counts.add_event(event_type, user)
            else:
                later.append((ts, event_type, user))
        for early in self.provisional:
            if head is not None and early.entry_id <= head.applied_id(early.partition):
                for _, event_type, user in early.events:  # the head holds them now
                    counts.remove_event(event_type, user)
            else:
                provisional.append(early)
        last = last_ids(entries, self.last)
        running = Running(self.basis, _version(head), to, last, counts, later, provisional)
        running._add(entries, head)
        return running

    def _add(self, entries: Sequence[TailEntry], head: Head | None) -> None:
        start, to, counts = self.basis.start, self.to, self.counts
        head_minute = head.minute if head is not None and head.minute is not None else NONE_HELD
        for entry in entries:
            held = held_before(entry, head)
            events = entry.events
            self.events_read += len(events.ts)
            first, newest = min(events.ts), max(events.ts)
            if max(start, held) <= first and newest < to:
                # the whole entry counts (the usual case): count it in C
                counts.total += len(events.ts)
                _add_all(counts.types, Counter(events.types))
                _add_all(counts.users, Counter(events.users))
                if held == NONE_HELD and first < head_minute:
                    self._provisional(entry, start, head_minute)
                continue
            for ts, event_type, user in zip(events.ts, events.types, events.users, strict=True):
                if ts < start or ts < held:
                    continue
                if ts < to:
                    counts.add_event(event_type, user)
                else:
                    self.later.append((ts, event_type, user))
            if held == NONE_HELD and first < head_minute:
                self._provisional(entry, start, head_minute)

    def _provisional(self, entry: TailEntry, start: int, head_minute: int) -> None:
        events = entry.events
        early = [(ts, t, u) for ts, t, u in zip(events.ts, events.types, events.users, strict=True)
                 if start <= ts < head_minute]  # fmt: skip
        if early:
            self.provisional.append(Provisional(entry.partition, entry.entry_id, early))


def _version(head: Head | None) -> int:
    return head.version if head is not None else 0


def _add_all(into: dict[str, int], counted: Counter[str]) -> None:
    if not into:
        into.update(counted)
        return
    for key, n in counted.items():
        into[key] = into.get(key, 0) + n


class RunningTails:
    """One worker's running counts by (account, window); the least recently used go first."""

    def __init__(self, limit: int = KEPT_COUNTS) -> None:
        self._kept: LRUCache[tuple[str, str], Running] = LRUCache(limit)

    def get(self, account: str, window: str) -> Running | None:
        return self._kept.get((account, window))

    def keep(self, account: str, window: str, running: Running) -> None:
        """Keep the newer of this count and the one kept (concurrent summaries race here)."""
        kept = self._kept.get((account, window))
        if kept is not None and kept.basis == running.basis and kept.to > running.to:
            return
        self._kept[(account, window)] = running

    def __len__(self) -> int:
        return len(self._kept)
