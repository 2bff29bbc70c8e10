"""API keys (401/403), the rate limit (429) and the queue bound (503), all storing nothing."""

from __future__ import annotations

import time

import httpx

from tests.conftest import AppFactory
from tests.support import drained, eventually, ids, make_event, unique


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


async def next_second(after: float = 0, margin: float = 0.3) -> int:
    """Wait until a second of the clock later than ``after`` has just begun (the limit counts
    per second of the service's clock, the same as this one: the app runs in this
    process); return it."""

    def begun() -> float:
        now = time.time()
        return now if int(now) > after and now % 1 < margin else 0

    return int(await eventually(begun, 3, 0.005, what="the start of a second"))


async def test_rate_limit_refuses_exactly_the_batches_over_the_limit(app: AppFactory) -> None:
    """100 events/s per client: within one second, batches are admitted while they fit
    (a smaller one after a refusal still does), each refusal is a 429 with Retry-After;
    the next second admits a whole MAX_BATCH_EVENTS batch again. Exactly the admitted
    batches are stored."""
    running = await app(rate_limit_events_per_second=100, max_batch_events=100)
    running.start_flusher()
    account = unique("rl")
    sizes = [40, 40, 40, 20, 1]  # 40, 80, (120: over), 100, (101: over)
    accepted: list[str] = []
    n = 0

    async def send(size: int) -> httpx.Response:
        nonlocal n
        batch = [make_event(account, n + j) for j in range(size)]
        n += size
        response = await running.post(batch)
        if response.status_code == 202:
            accepted.extend(e["event_id"] for e in batch)
        else:
            assert response.status_code == 429, response.text
            assert response.json()["error"] == "rate_limited"
            assert int(response.headers["retry-after"]) >= 1
        return response

    for _ in range(5):  # the rare second that ends mid-way is tried again
        second = await next_second()
        statuses = [(await send(size)).status_code for size in sizes]
        if int(time.time()) == second:
            break
    else:
        raise AssertionError("could not send five batches within one second")
    assert statuses == [202, 202, 429, 202, 429]
    await next_second(after=second)
    whole = await send(100)  # a batch as large as the limit: admitted in a fresh second
    assert whole.status_code == 202
    assert len(accepted) >= 200
    await eventually(drained(running.backends, account, len(accepted)),
                     what=f"the {len(accepted)} accepted")  # fmt: skip
    assert ids(running.backends.stored(account)) == sorted(accepted)


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
