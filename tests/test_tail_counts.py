"""A worker's running count of a tail equals counting the whole tail afresh, step by step.

Random histories of appended tail entries (late, current and future
timestamps, two partitions), heads of the same minute applying more and more
entries (what the rollup job writes when late events arrive) and a clock
moving on; after every step the running count must equal both a fresh count
and an oracle written straight from the rule in ``core/tail.py``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.buckets import HOUR, MINUTE, Counts
from core.rollup_docs import Head
from core.tail import StreamId, TailEntry, TailEvents
from service.tail_counts import Basis, Running, RunningTails

MINUTE_S = 600 * MINUTE  # the head's minute
START = MINUTE_S - HOUR  # a 1h window asked during minute S

event_st = st.tuples(
    st.integers(START - 2 * MINUTE, MINUTE_S + 3 * MINUTE),  # before the window .. future
    st.sampled_from(["login", "page_view"]),
    st.sampled_from(["u1", "u2", "u3"]),
)
step_st = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.lists(event_st, min_size=1, max_size=4)),
    st.tuples(st.just("apply"), st.integers(0, 1), st.integers(0, 6)),
    st.tuples(st.just("tick"), st.integers(0, 2 * MINUTE), st.just(0)),
    st.tuples(st.just("summary"), st.just(0), st.just(0)),
)


@dataclass
class History:
    entries: list[TailEntry] = field(default_factory=list)
    applied: dict[int, StreamId] = field(default_factory=dict)
    version: int = 1
    to: int = MINUTE_S + 1000
    clock: int = MINUTE_S  # entry ids: milliseconds that only grow

    def head(self) -> Head:
        return Head("acc", self.version, MINUTE_S, dict(self.applied))

    def append(self, partition: int, events: list[tuple[int, str, str]]) -> None:
        self.clock += 1
        ts, types, users = (list(column) for column in zip(*events, strict=True))
        self.entries.append(TailEntry(partition, (self.clock, 0), TailEvents(ts, types, users)))

    def apply(self, partition: int, back: int) -> None:
        """A new head applies the partition's entries up to the back-th newest one."""
        ids = [e.entry_id for e in self.entries if e.partition == partition]
        if ids:
            newest = ids[max(0, len(ids) - 1 - back)]
            if newest > self.applied.get(partition, (0, 0)):
                self.applied[partition] = newest
                self.version += 1


def oracle(history: History) -> Counts:
    """Straight from the rule: not held by the head, and inside [start, to)."""
    counts, types, users = 0, Counter[str](), Counter[str]()
    for entry in history.entries:
        applied = entry.entry_id <= history.applied.get(entry.partition, (0, 0))
        e = entry.events
        for ts, event_type, user in zip(e.ts, e.types, e.users, strict=True):
            if (applied and ts < MINUTE_S) or not START <= ts < history.to:
                continue
            counts += 1
            types[event_type] += 1
            users[user] += 1
    return Counts(counts, dict(types), dict(users))


@settings(max_examples=300, deadline=None)
@given(st.lists(step_st, max_size=40))
def test_a_running_count_equals_a_fresh_count_after_every_step(steps: list[Any]) -> None:
    history = History()
    running: Running | None = None
    seen = 0  # entries the running count has read
    for kind, a, b in [*steps, ("summary", 0, 0)]:
        if kind == "append":
            history.append(a, b)
        elif kind == "apply":
            history.apply(a, b)
        elif kind == "tick":
            history.to += a
        else:
            head, basis = history.head(), Basis.of(history.head(), START)
            fresh = Running.count(basis, head, history.entries, history.to)
            if running is None:
                running = fresh
            else:
                assert running.continues(basis, head, history.to)
                running = running.advanced(head, history.entries[seen:], history.to)
                assert running.events_read == sum(len(e.events.ts) for e in history.entries[seen:])
            seen = len(history.entries)
            assert running.counts == fresh.counts == oracle(history)


def test_another_minute_or_window_start_or_an_older_head_needs_a_fresh_count() -> None:
    head = Head("acc", 5, MINUTE_S, {0: (1, 0)})
    running = Running.count(Basis.of(head, START), head, [], MINUTE_S + 10)
    assert running.continues(Basis.of(head, START), head, MINUTE_S + 10)
    next_minute = Head("acc", 6, MINUTE_S + MINUTE, {0: (1, 0)})
    assert not running.continues(Basis.of(next_minute, START), next_minute, MINUTE_S + MINUTE)
    assert not running.continues(Basis.of(head, START + MINUTE), head, MINUTE_S + 10)
    assert not running.continues(Basis.of(None, START), None, MINUTE_S + 10)
    older = Head("acc", 4, MINUTE_S, {})  # a store rolled up again from scratch
    assert not running.continues(Basis.of(older, START), older, MINUTE_S + 10)
    assert not running.continues(Basis.of(head, START), head, MINUTE_S + 9)  # clock went back


def test_running_tails_keep_the_newest_count_and_a_bounded_number() -> None:
    tails = RunningTails(limit=2)
    basis = Basis(None, False, START)
    newer, older = Running(basis, 0, 20, {}), Running(basis, 0, 10, {})
    tails.keep("a", "1h", newer)
    tails.keep("a", "1h", older)  # a slower concurrent summary finishing last
    assert tails.get("a", "1h") is newer
    tails.keep("b", "1h", older)
    tails.keep("c", "1h", older)
    assert len(tails) == 2 and tails.get("a", "1h") is None  # least recently used went
