"""API keys (401/403), the rate limit (429) and the queue bound (503), all storing nothing."""

from __future__ import annotations

import httpx

from tests.conftest import ServiceFactory
from tests.support import drained, make_event, unique, wait_for


def test_api_keys(start_service: ServiceFactory) -> None:
    service, backends = start_service(api_keys="k_one=acc_a|acc_b,k_all=*")
    mine, other = "acc_a", "acc_z"

    def post(key: str | None, account: str, n: int, bearer: bool = False) -> httpx.Response:
        headers = {}
        if key and bearer:
            headers["authorization"] = f"Bearer {key}"
        elif key:
            headers["x-api-key"] = key
        return service.post([make_event(account, n)], headers=headers)

    missing = post(None, mine, 1)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert post("wrong", mine, 2).status_code == 401
    forbidden = service.post(
        [make_event(mine, 3), make_event(other, 3)], headers={"x-api-key": "k_one"}
    )
    assert forbidden.status_code == 403
    assert forbidden.json()["accounts"] == [other]
    assert post("k_one", mine, 4).status_code == 202
    assert post("k_one", mine, 5, bearer=True).status_code == 202
    assert post("k_all", other, 6).status_code == 202
    wait_for(drained(backends, other, 1), what="the k_all event")
    wait_for(drained(backends, mine, 2), what="the k_one events")
    assert sorted(d["event_id"] for d in backends.stored(mine)) == ["e4", "e5"]


def test_rate_limit_answers_429_with_retry_after(start_service: ServiceFactory) -> None:
    service, backends = start_service(rate_limit_events_per_second=100)
    account = unique("rl")
    statuses = []
    accepted = 0
    for i in range(8):
        batch = [make_event(account, i * 40 + j) for j in range(40)]
        response = service.post(batch)
        statuses.append(response.status_code)
        if response.status_code == 202:
            accepted += 40
        else:
            assert response.status_code == 429
            assert response.json()["error"] == "rate_limited"
            assert int(response.headers["retry-after"]) >= 1
    assert 429 in statuses
    wait_for(drained(backends, account, accepted), what=f"exactly the {accepted} accepted")


def test_full_queue_sheds_with_503_and_recovers_when_drained(
    start_service: ServiceFactory,
) -> None:
    no_flusher, backends = start_service(queue_max_events=100, run_flusher=False)
    account = unique("bound")
    batch = [make_event(account, i) for i in range(50)]
    assert no_flusher.post(batch).status_code == 202
    assert no_flusher.post([make_event(account, 50 + i) for i in range(50)]).status_code == 202
    shed = no_flusher.post([make_event(account, 100)])
    assert shed.status_code == 503
    assert shed.json()["error"] == "overloaded"
    assert shed.headers["retry-after"]
    assert backends.queue_depth() == 100
    # a flusher on the same stream drains it; ingest resumes by itself
    start_service(queue_max_events=100, mongo_db=backends.db_name, stream_key=backends.stream)
    wait_for(drained(backends, account, 100), what="the 100 queued events")
    assert no_flusher.post([make_event(account, 101)]).status_code == 202
    wait_for(drained(backends, account, 101))
    assert "e100" not in {d["event_id"] for d in backends.stored(account)}
