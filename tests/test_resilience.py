"""Invariant 1 under crashes and outages: every 202 is stored exactly once.

Each test drives real traffic at a real service on servers it owns, breaks
something for real (SIGKILL, stopping a server), and then checks MongoDB.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from scripts.stack import Stack
from tests.conftest import ServiceFactory
from tests.support import Backends, Service, make_event, unique, wait_for


@dataclass
class Traffic:
    """Posts batches in a background thread and remembers what was accepted."""

    service: Service
    account: str
    batch_size: int = 50
    pause: float = 0.0  # between requests: bounds how much a test must drain
    accepted: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        with httpx.Client(base_url=self.service.url, timeout=10) as client:
            while not self._stop.is_set():
                batch = [make_event(self.account, n + i) for i in range(self.batch_size)]
                n += self.batch_size
                try:
                    response = client.post("/events", json=batch)
                except httpx.HTTPError:
                    self.statuses[0] += 1
                    time.sleep(0.05)
                    continue
                self.statuses[response.status_code] += 1
                if response.status_code == 202:
                    self.accepted.extend(e["event_id"] for e in batch)
                    time.sleep(self.pause)
                else:
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"]
                    time.sleep(0.05)

    def wait_accepted(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: len(self.accepted) >= count, timeout, what=f"{count} accepted")


def assert_stored_exactly(backends: Backends, account: str, accepted: list[str]) -> None:
    expected = set(accepted)
    assert len(expected) == len(accepted), "the generator never repeats ids"
    wait_for(lambda: backends.count(account) == len(expected), 300, 0.5,
             what=f"{len(expected)} events stored")  # fmt: skip
    stored = [d["event_id"] for d in backends.events.find({"account_id": account}, {"event_id": 1})]
    assert len(stored) == len(set(stored))
    assert set(stored) == expected
    wait_for(lambda: backends.queue_depth() == 0, 30, what="the queue to drain")


def test_flusher_sigkilled_mid_batch_loses_and_duplicates_nothing(
    start_service: ServiceFactory,
) -> None:
    service, backends = start_service(flush_batch_size=200)
    account = unique("crash")
    with Traffic(service, account) as traffic:
        for _ in range(3):
            traffic.wait_accepted(len(traffic.accepted) + 500)
            [flusher] = service.pids_titled("flusher")
            os.kill(flusher, signal.SIGKILL)
            wait_for(
                lambda: service.pids_titled("flusher") not in ([], [flusher]),  # noqa: B023
                20,
                what="the watchdog to restart the flusher",
            )
        traffic.wait_accepted(len(traffic.accepted) + 500)
    assert traffic.statuses[202] > 0
    assert_stored_exactly(backends, account, traffic.accepted)


def test_mongodb_down_for_20s_ingest_keeps_accepting_and_nothing_is_lost(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    service, backends = start_own_service()
    assert own_stack.mongo is not None
    account = unique("mongo_outage")
    with Traffic(service, account, batch_size=20, pause=0.02) as traffic:
        traffic.wait_accepted(200)
        own_stack.mongo.stop()
        down_from = len(traffic.accepted)
        time.sleep(20)  # the outage itself; nothing is being waited for here
        accepted_while_down = len(traffic.accepted) - down_from
        assert httpx.get(f"{service.url}/ready").status_code == 503
        own_stack.mongo.start()
        traffic.wait_accepted(len(traffic.accepted) + 200)
    assert accepted_while_down > 0, "ingest must not depend on MongoDB"
    assert traffic.statuses[202] and not traffic.statuses[500]
    assert_stored_exactly(backends, account, traffic.accepted)


def test_redis_killed_and_restarted_from_its_append_only_file(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    service, backends = start_own_service()
    assert own_stack.redis is not None and own_stack.mongo is not None
    account = unique("redis_restart")
    # MongoDB down first, so accepted events are still only in Redis when it dies
    own_stack.mongo.stop()
    batch = [make_event(account, i) for i in range(300)]
    for i in range(0, 300, 50):
        assert service.post(batch[i : i + 50]).status_code == 202
    own_stack.redis.kill()
    refused = service.post([make_event(account, 999)])
    assert refused.status_code == 503
    assert refused.headers["retry-after"]
    own_stack.redis.start()
    own_stack.mongo.start()
    wait_for(service.is_ready, 60, what="ready again")
    assert_stored_exactly(backends, account, [e["event_id"] for e in batch])


def test_sigterm_drains_what_was_read_and_acks(start_service: ServiceFactory) -> None:
    service, backends = start_service()
    account = unique("drain")
    with Traffic(service, account) as traffic:
        traffic.wait_accepted(1000)
    assert service.stop() == 0
    pending = backends.redis.xpending(backends.stream, "flusher")
    assert pending["pending"] == 0, "a clean stop leaves nothing read-but-unacknowledged"
    # whatever was not yet read waits in the stream for the next start
    assert service.log_path is not None
    service.start(service.log_path.parent)
    assert_stored_exactly(backends, account, traffic.accepted)


def test_entries_that_can_never_be_stored_go_to_the_dead_letter_stream(
    start_service: ServiceFactory,
) -> None:
    """Never silently dropped: an undecodable entry and one MongoDB refuses (written
    straight to the stream, past the API's validation) end up dead-lettered with
    their reason, and the good batches around them are stored."""
    service, backends = start_service(dead_letter_after=2, claim_idle_ms=500)
    account = unique("dlq")
    assert service.post([make_event(account, 1)]).status_code == 202
    unstorable = [make_event(account, 2, metadata={"m": [[1, 2]]})]  # FerretDB refuses it
    for body in (b"not json at all", json.dumps(unstorable).encode()):
        backends.redis.xadd(backends.stream, {"n": 1, "b": body})
        backends.redis.incrby(f"{backends.stream}:depth", 1)
    assert service.post([make_event(account, 3)]).status_code == 202
    dead_key = f"{backends.stream}:dead"
    wait_for(lambda: backends.redis.xlen(dead_key) == 2, 60, what="two dead-lettered entries")
    entries: Any = backends.redis.xrange(dead_key)
    reasons = sorted(fields[b"reason"].decode() for _, fields in entries)
    assert reasons[0].startswith("MongoDB refused the write")
    assert reasons[1].startswith("undecodable entry")
    assert {fields[b"b"] for _, fields in entries} == {
        b"not json at all", json.dumps(unstorable).encode(),
    }  # fmt: skip
    wait_for(lambda: backends.queue_depth() == 0, 30, what="the queue to drain")
    assert sorted(d["event_id"] for d in backends.stored(account)) == ["e1", "e3"]
