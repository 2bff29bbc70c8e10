"""Invariant 1 under crashes and outages: every 202 is stored exactly once.

Each test drives real traffic at a real service on servers it owns, breaks
something for real (SIGKILL, stopping or freezing a server), and then checks
MongoDB, and that /summary agrees with what is stored.
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

from scripts.stack import Server, Stack
from tests.conftest import ServiceFactory
from tests.oracle import figures, ground_truth, parse_iso
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
    unexpected: list[str] = field(default_factory=list)  # checked by the test, not the thread
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
        assert not self._thread.is_alive(), "the traffic thread did not stop"
        assert not self.unexpected, self.unexpected[:5]

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
                    if response.status_code != 503 or not response.headers.get("retry-after"):
                        self.unexpected.append(f"{response.status_code}: {response.text}")
                    time.sleep(0.05)

    def wait_accepted(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: len(self.accepted) >= count, timeout, what=f"{count} accepted")


def assert_stored_exactly(
    backends: Backends, account: str, accepted: list[str], service: Service | None = None
) -> None:
    """Every accepted event stored once, nothing else; and the summary agrees."""
    expected = set(accepted)
    assert len(expected) == len(accepted), "the generator never repeats ids"
    wait_for(lambda: backends.queue_depth() == 0 and backends.pending() == 0, 300, 0.5,
             what="the queue to drain")  # fmt: skip
    stored = [d["event_id"] for d in backends.events.find({"account_id": account}, {"event_id": 1})]
    assert len(stored) == len(set(stored))
    assert set(stored) == expected
    if service is not None:
        got = httpx.get(f"{service.url}/summary/{account}", params={"window": "1h", "top": 10},
                        timeout=30).json()  # fmt: skip
        truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 10)  # fmt: skip
        assert figures(got) == truth


def frozen(server: Server) -> Any:
    """SIGSTOP a server (it hangs: slow, not down), SIGCONT it on exit."""
    import contextlib

    @contextlib.contextmanager
    def freeze() -> Any:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

    return freeze()


def test_flusher_sigkilled_mid_write_loses_and_duplicates_nothing(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    """Killed while its insert is in flight (the store frozen under it), three times."""
    service, backends = start_own_service(flush_batch_size=200)
    assert own_stack.mongo is not None
    account = unique("crash")
    with Traffic(service, account, pause=0.01) as traffic:
        for _ in range(3):
            traffic.wait_accepted(len(traffic.accepted) + 400)
            with frozen(own_stack.mongo):
                wait_for(lambda: backends.pending() > 0, 20, what="a batch read, not yet acked")
                [flusher] = service.pids_titled("flusher")
                os.kill(flusher, signal.SIGKILL)
            wait_for(lambda: service.pids_titled("flusher") not in ([], [flusher]),  # noqa: B023
                     20, what="the watchdog to restart the flusher")  # fmt: skip
        traffic.wait_accepted(len(traffic.accepted) + 400)
    assert traffic.statuses[202] > 0
    assert_stored_exactly(backends, account, traffic.accepted, service)


def test_mongodb_down_for_a_minute_ingest_keeps_accepting_and_nothing_is_lost(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    service, backends = start_own_service()
    assert own_stack.mongo is not None
    account = unique("mongo_outage")
    with Traffic(service, account, batch_size=20, pause=0.05) as traffic:
        traffic.wait_accepted(200)
        own_stack.mongo.stop()
        down_from = len(traffic.accepted)
        time.sleep(60)  # the outage itself (the spec's minute); nothing is waited for here
        accepted_while_down = len(traffic.accepted) - down_from
        assert httpx.get(f"{service.url}/ready").status_code == 503
        summary = httpx.get(f"{service.url}/summary/{account}", timeout=30)
        assert summary.status_code == 503 and summary.headers["retry-after"]
        own_stack.mongo.start()
        traffic.wait_accepted(len(traffic.accepted) + 200, timeout=120)
    assert accepted_while_down > 0, "ingest must not depend on MongoDB"
    assert traffic.statuses[202] and not traffic.statuses[500]
    assert_stored_exactly(backends, account, traffic.accepted, service)


def test_a_frozen_store_delays_counting_but_loses_nothing(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    """Writes slower than MONGO_TIMEOUT_MS: retried, stored once, counted once."""
    service, backends = start_own_service(mongo_timeout_ms=1000)
    assert own_stack.mongo is not None
    account = unique("slow")
    with Traffic(service, account, batch_size=20, pause=0.02) as traffic:
        traffic.wait_accepted(200)
        for _ in range(2):
            with frozen(own_stack.mongo):
                time.sleep(4)  # several write timeouts long
            traffic.wait_accepted(len(traffic.accepted) + 100)
    assert_stored_exactly(backends, account, traffic.accepted, service)


def test_a_retry_after_a_redis_timeout_stores_the_batch_once(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    """A 503 after a Redis timeout may follow an XADD Redis applies later: re-sending is safe."""
    service, backends = start_own_service()
    assert own_stack.redis is not None
    account = unique("retry")
    batch = [make_event(account, i) for i in range(30)]
    with frozen(own_stack.redis):
        refused = service.post(batch)  # Redis takes the command, answers too late
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert service.post(batch).status_code == 202  # the client retries, as documented
    assert_stored_exactly(backends, account, [e["event_id"] for e in batch], service)
    assert backends.tail_events(account) <= 30


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
    assert_stored_exactly(backends, account, [e["event_id"] for e in batch], service)


def test_sigterm_drains_what_was_read_and_acks(start_service: ServiceFactory) -> None:
    service, backends = start_service()
    account = unique("drain")
    with Traffic(service, account) as traffic:
        traffic.wait_accepted(1000)
    assert service.stop() == 0
    assert backends.pending() == 0, "a clean stop leaves nothing read-but-unacknowledged"
    # whatever was not yet read waits in the stream for the next start
    assert service.log_path is not None
    service.start(service.log_path.parent)
    assert_stored_exactly(backends, account, traffic.accepted, service)


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
    part = backends.partitions[0]
    for body in (b"not json at all", json.dumps(unstorable).encode()):
        backends.redis.xadd(part.stream, {"count": 1, "body": body})
        backends.redis.incrby(part.depth, 1)
    assert service.post([make_event(account, 3)]).status_code == 202
    wait_for(lambda: len(backends.dead_letters()) == 2, 60, what="two dead-lettered entries")
    entries: Any = backends.dead_letters()
    reasons = sorted(fields[b"reason"].decode() for _, fields in entries)
    assert reasons[0].startswith("MongoDB refused the write")
    assert reasons[1].startswith("undecodable entry")
    assert {fields[b"body"] for _, fields in entries} == {
        b"not json at all", json.dumps(unstorable).encode(),
    }  # fmt: skip
    wait_for(lambda: backends.queue_depth() == 0, 30, what="the queue to drain")
    assert sorted(d["event_id"] for d in backends.stored(account)) == ["e1", "e3"]
    assert summary_total(service, account) == 2


def summary_total(service: Service, account: str) -> int:
    return int(httpx.get(f"{service.url}/summary/{account}").json()["total"])
