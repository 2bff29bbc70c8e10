"""Partitioned streams on a real local Redis Cluster (three masters, `redis-cli --cluster create`).

The service runs unchanged against it (``REDIS_CLUSTER=true``,
``STREAM_PARTITIONS=6``, so batches spread over every master). While traffic
flows, one master's process is SIGKILLed: batches for its partitions are
answered 503 with ``Retry-After`` (never a 202 that is then lost), the others
keep flowing; when the node comes back from its append-only file, everything
accepted is stored exactly once and the summaries are exact.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from core.keys import partition_of
from scripts.stack import RedisClusterNode, Stack, running_redis_cluster
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import Backends, Service, make_event, service_env, unique, wait_for

PARTITIONS = 6


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisClusterNode]]:
    with running_redis_cluster(tmp_path / "cluster") as nodes:
        yield nodes


@dataclass
class Traffic:
    """Batches for many accounts from a background thread; what was answered is recorded."""

    service: Service
    accounts: list[str]
    accepted: list[tuple[str, str]] = field(default_factory=list)  # (account, event id)
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    abandoned: list[tuple[str, str]] = field(default_factory=list)  # 503'd when stopping
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        # a client per account: a request stuck on the dead node holds up only its own
        for k, account in enumerate(self.accounts):
            thread = threading.Thread(target=self._run, args=(k, account), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "a traffic thread did not stop"

    def _run(self, k: int, account: str) -> None:
        """Post batches; a batch answered 503 is sent again until it is taken, as the API
        docs tell clients to do (a 503 may follow a write Redis applied: re-sending is safe)."""
        n = 0
        with httpx.Client(base_url=self.service.url, timeout=30) as client:
            while not self._stop.is_set():
                batch = [make_event(account, n * 10 + i, user=f"u{i % 4}") for i in range(10)]
                n += 1
                while not self._stop.is_set():
                    try:
                        response = client.post("/events", json=batch)
                    except httpx.HTTPError:
                        self.statuses[0] += 1
                        continue
                    self.statuses[response.status_code] += 1
                    if response.status_code == 202:
                        self.accepted.extend((account, e["event_id"]) for e in batch)
                        break
                    if response.status_code != 503 or not response.headers.get("retry-after"):
                        self.unexpected.append(f"{response.status_code}: {response.text}")
                        break
                    time.sleep(0.2)
                else:
                    self.abandoned.extend((account, e["event_id"]) for e in batch)
                time.sleep(0.02)


def spread_accounts(backends: Backends) -> list[str]:
    """Two accounts for every partition, so batches go to every master."""
    per_partition: dict[int, list[str]] = {}
    while (
        min((len(v) for v in per_partition.values()), default=0) < 2
        or len(per_partition) < PARTITIONS
    ):
        name = unique("c")
        per_partition.setdefault(partition_of(backends.settings, name).index, []).append(name)
    return [a for names in per_partition.values() for a in names[:2]]


def test_the_pipeline_on_a_redis_cluster_survives_a_master_dying(
    stack: Stack, cluster: list[RedisClusterNode], tmp_path: Path
) -> None:
    redis_url = cluster[0].url
    env = service_env(redis_url, stack.mongo_url, tmp_path, redis_cluster="true",
                      stream_partitions=PARTITIONS, flushers=2)  # fmt: skip
    service = Service(env=env, workers=2)
    service.start(tmp_path)
    backends = Backends(redis_url, stack.mongo_url, env["MONGO_DB"], env["STREAM_KEY"],
                        PARTITIONS, cluster=True)  # fmt: skip
    accounts = spread_accounts(backends)
    try:
        with Traffic(service, accounts) as traffic:
            wait_for(lambda: len(traffic.accepted) >= 500, 60, what="traffic flowing")
            victim = cluster[1]
            victim.kill()
            before = Counter(traffic.statuses)
            wait_for(lambda: traffic.statuses[503] > before[503] + 5, 60,
                     what="503s for the dead node's partitions")  # fmt: skip
            accepted_while_down = len(traffic.accepted)
            wait_for(lambda: len(traffic.accepted) > accepted_while_down + 200, 30,
                     what="the other partitions to keep working")  # fmt: skip
            victim.start()
            resumed = len(traffic.accepted)
            wait_for(lambda: len(traffic.accepted) >= resumed + 500, 60, what="recovery")
        assert not traffic.unexpected, traffic.unexpected[:5]
        assert traffic.statuses[202] > 0 and not traffic.statuses[500]
        wait_for(lambda: backends.queue_depth() == 0 and backends.pending() == 0, 120, 0.5,
                 what="every partition drained")  # fmt: skip
        for p in backends.partitions:  # depth exact per partition
            assert int(backends.redis.get(p.depth) or 0) == 0
        stored = list(backends.events.find({}, {"account_id": 1, "event_id": 1}))
        pairs = [(d["account_id"], d["event_id"]) for d in stored]
        assert len(pairs) == len(set(pairs)), "stored exactly once"
        assert set(traffic.accepted) <= set(pairs), "every 202 stored"
        # a batch answered 503 while the test stopped may have been taken all the same
        assert set(pairs) - set(traffic.accepted) <= set(traffic.abandoned), "nothing else"
        for account in accounts[:4]:
            got = httpx.get(f"{service.url}/summary/{account}", params={"window": "1h"},
                            timeout=30).json()  # fmt: skip
            truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                                 parse_iso(got["to"]), 5)  # fmt: skip
            assert figures(got) == truth
    finally:
        service.stop()
        backends.close()
