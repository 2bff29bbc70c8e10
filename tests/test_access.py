"""API keys (401/403), the rate limit (429) and the queue bound (503), all storing nothing."""

from __future__ import annotations

import httpx

from tests.conftest import AppFactory
from tests.support import drained, eventually, make_event, unique


async def test_api_keys_for_writing_and_reading(app: AppFactory) -> None:
    mine, other = unique("acc_a"), unique("acc_z")
    running = await app(api_keys=f"k_one={mine}|acc_b,k_all=*")
    running.start_flusher()

    async def post(key: str | None, account: str, n: int, bearer: bool = False) -> httpx.Response:
        headers = {}
        if key and bearer:
            headers["authorization"] = f"Bearer {key}"
        elif key:
            headers["x-api-key"] = key
        return await running.post([make_event(account, n)], headers=headers)

    missing = await post(None, mine, 1)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert (await post("wrong", mine, 2)).status_code == 401
    forbidden = await running.post(
        [make_event(mine, 3), make_event(other, 3)], headers={"x-api-key": "k_one"}
    )
    assert forbidden.status_code == 403
    assert forbidden.json()["accounts"] == [other]
    assert (await post("k_one", mine, 4)).status_code == 202
    assert (await post("k_one", mine, 5, bearer=True)).status_code == 202
    assert (await post("k_all", other, 6)).status_code == 202
    await eventually(drained(running.backends, other, 1), what="the k_all event")
    await eventually(drained(running.backends, mine, 2), what="the k_one events")
    assert sorted(d["event_id"] for d in running.backends.stored(mine)) == ["e4", "e5"]
    # reading needs a key that may read the account
    client = running.client
    assert (await client.get(f"/summary/{mine}")).status_code == 401
    assert (
        await client.get(f"/summary/{other}", headers={"x-api-key": "k_one"})
    ).status_code == 403
    ok = await client.get(f"/summary/{mine}", headers={"x-api-key": "k_one"})
    assert ok.status_code == 200 and ok.json()["total"] == 2


async def test_rate_limit_answers_429_with_retry_after(app: AppFactory) -> None:
    running = await app(rate_limit_events_per_second=100)
    running.start_flusher()
    account = unique("rl")
    statuses = []
    accepted = 0
    for i in range(8):
        batch = [make_event(account, i * 40 + j) for j in range(40)]
        response = await running.post(batch)
        statuses.append(response.status_code)
        if response.status_code == 202:
            accepted += 40
        else:
            assert response.status_code == 429
            assert response.json()["error"] == "rate_limited"
            assert int(response.headers["retry-after"]) >= 1
    assert 429 in statuses
    await eventually(drained(running.backends, account, accepted), what=f"the {accepted} accepted")


async def test_full_queue_sheds_with_503_and_recovers_when_drained(app: AppFactory) -> None:
    running = await app(queue_max_events=100)  # no flusher yet
    account = unique("bound")
    batch = [make_event(account, i) for i in range(50)]
    assert (await running.post(batch)).status_code == 202
    assert (await running.post([make_event(account, 50 + i) for i in range(50)])).status_code == 202
    shed = await running.post([make_event(account, 100)])
    assert shed.status_code == 503
    assert shed.json()["error"] == "overloaded"
    assert shed.headers["retry-after"]
    assert running.backends.queue_depth() == 100
    running.start_flusher()  # the backlog drains; ingest resumes by itself
    await eventually(drained(running.backends, account, 100), what="the 100 queued events")
    assert (await running.post([make_event(account, 101)])).status_code == 202
    await eventually(drained(running.backends, account, 101))
    assert "e100" not in {d["event_id"] for d in running.backends.stored(account)}
