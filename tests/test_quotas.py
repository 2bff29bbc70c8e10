"""Per-account quotas: rate, distinct types per day, accounts per key and hour, overrides on
keys; and a hot account over its rate does not slow the others."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from core.settings import SettingsError, load_settings
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.support import drained, eventually, make_event, unique, wait_for

ADMIN = {"x-api-key": "boot"}


async def at_start_of_a_second() -> None:
    """Early in a second: a test's requests then share one per-second bucket."""
    await eventually(lambda: time.time() % 1 < 0.3, 2, 0.005, what="an early moment")


async def test_an_account_over_its_rate_gets_429_and_the_others_do_not(app: AppFactory) -> None:
    running = await app(account_events_per_second=100, max_batch_events=100)
    running.start_flusher()
    hot, calm = unique("hot"), unique("calm")
    await at_start_of_a_second()
    statuses = []
    for i in range(3):  # 60 + 60 > 100: the second and third are refused
        batch = [make_event(hot, i * 60 + j) for j in range(60)]
        statuses.append((await running.post(batch)).status_code)
    refused = await running.post([make_event(hot, 999)] * 1)
    calm_status = (await running.post([make_event(calm, n) for n in range(100)])).status_code
    assert statuses == [202, 429, 429], statuses
    assert refused.status_code == 202  # 61 of 100: still room
    assert calm_status == 202  # another account: its own 100
    body = (await running.post([make_event(hot, 500 + n) for n in range(50)])).json()
    assert body["error"] == "rate_limited" and hot in body["message"] and "100" in body["message"]
    await eventually(drained(running.backends, hot, 61))
    await eventually(drained(running.backends, calm, 100))


async def test_types_per_day_are_counted_per_account_and_refused_past_the_limit(
    app: AppFactory,
) -> None:
    running = await app(account_types_per_day=3)
    running.start_flusher()
    account, other = unique("types"), unique("other")

    def event(n: int, kind: str, acc: str = account) -> dict[str, object]:
        return make_event(acc, n, type_=kind)

    assert (await running.post([event(1, "a"), event(2, "b")])).status_code == 202
    assert (await running.post([event(3, "a"), event(4, "c")])).status_code == 202
    over = await running.post([event(5, "a"), event(6, "d")])  # a 4th type
    assert over.status_code == 403
    assert over.json()["error"] == "quota_exceeded" and "3 distinct" in over.json()["message"]
    assert (await running.post([event(7, "b")] * 1)).status_code == 202  # known types go on
    assert (await running.post([event(8, "d", other)])).status_code == 202  # another account
    await eventually(drained(running.backends, account, 5))
    assert {d["type"] for d in running.backends.stored(account)} == {"a", "b", "c"}
    # a second worker that never saw the account checks with Redis, not its memory
    second = await running_twin(app, running)
    assert (await second.post([event(9, "e")])).status_code == 403
    assert (await second.post([event(10, "c")])).status_code == 202


async def running_twin(app: AppFactory, running: Running) -> Running:
    s = running.settings
    return await app(mongo_db=s.mongo_db, stream_key=s.stream_key,
                     account_types_per_day=s.account_types_per_day)  # fmt: skip


async def test_keys_carry_their_own_quotas_and_a_cap_on_accounts_per_hour(
    app: AppFactory,
) -> None:
    running = await app(api_keys="boot=*@admin", key_accounts_per_hour=2,
                        account_events_per_second=1000)  # fmt: skip
    running.start_flusher()
    made = await running.client.post("/admin/keys", headers=ADMIN, json={
        "scope": "write", "accounts": ["*"], "quotas": {"accounts_per_hour": 3}})  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.json()["quotas"] == {"accounts_per_hour": 3}
    key = {"x-api-key": made.json()["key"]}
    await eventually(lambda: running.application.ctx.keyring.find(key["x-api-key"]))
    accounts = [unique("spray") for _ in range(5)]
    statuses = [(await running.post([make_event(a, 1)], headers=key)).status_code
                for a in accounts]  # fmt: skip
    assert statuses == [202, 202, 202, 429, 429]  # its own 3, not the setting's 2
    again = await running.post([make_event(accounts[0], 2)], headers=key)
    assert again.status_code == 202  # an account it already wrote this hour
    retry = await running.post([make_event(accounts[4], 3)], headers=key)
    assert 0 < int(retry.headers["retry-after"]) <= 3600
    bad = await running.client.post("/admin/keys", headers=ADMIN, json={
        "scope": "write", "accounts": ["a"], "quotas": {"bananas": 3}})  # fmt: skip
    assert bad.status_code == 400 and "bananas" in bad.text


def test_a_quota_below_a_full_batch_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="ACCOUNT_EVENTS_PER_SECOND"):
        load_settings({"ACCOUNT_EVENTS_PER_SECOND": "10"})
    assert load_settings({"ACCOUNT_EVENTS_PER_SECOND": "1000"}).account_events_per_second == 1000


def latencies(url: str, account: str, per_second: float, seconds: float,
              first: int) -> Callable[[], tuple[list[float], list[int], list[str]]]:  # fmt: skip
    """Start posting 10-event batches for ``account`` at ``per_second``; the returned
    function waits for the end and gives (latencies, statuses, accepted event ids)."""
    found: tuple[list[float], list[int], list[str]] = ([], [], [])

    def run() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < seconds:
                due = started + n / per_second
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                batch = [make_event(account, first + n * 10 + i) for i in range(10)]
                sent = time.perf_counter()
                status = client.post("/events", json=batch).status_code
                found[0].append(time.perf_counter() - sent)
                found[1].append(status)
                if status == 202:
                    found[2].extend(e["event_id"] for e in batch)
                n += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def done() -> tuple[list[float], list[int], list[str]]:
        thread.join(seconds + 30)
        return found

    return done


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_a_hot_account_at_ten_times_its_rate_leaves_the_others_alone(
    start_service: ServiceFactory,
) -> None:
    service, backends = start_service(workers=2, account_events_per_second=100,
                                      max_batch_events=10)  # fmt: skip
    calm = [unique("calm") for _ in range(9)]
    hot = unique("hot")
    # the nine alone, then the nine beside the hot one, 10-event batches: the nine at 5
    # a second each (50 events/s, half their limit), the hot one at 100 a second (1,000
    # events/s: ten times its 100)
    alone = [latencies(service.url, a, 5, 8, 0) for a in calm]
    before = [done() for done in alone]
    beside = [latencies(service.url, a, 5, 8, 100_000) for a in calm]
    flood = latencies(service.url, hot, 100, 8, 0)
    after = [done() for done in beside]
    hot_found = flood()
    calm_before = [t for lat, _, _ in before for t in lat]
    calm_after = [t for lat, _, _ in after for t in lat]
    assert all(s == 202 for _, statuses, _ in before + after for s in statuses)
    assert 429 in hot_found[1] and 202 in hot_found[1]
    print(f"calm p99 alone {p99(calm_before) * 1e3:.1f} ms, beside the hot account "
          f"{p99(calm_after) * 1e3:.1f} ms; hot: {hot_found[1].count(202)} admitted, "
          f"{hot_found[1].count(429)} refused")  # fmt: skip
    # within noise: this machine's latencies move a lot from one second to the next
    assert p99(calm_after) <= 3 * p99(calm_before) + 0.025
    for account, (_, _, ids) in zip(calm, before, strict=True):
        accepted = ids + next(found[2] for a, found in zip(calm, after, strict=True)
                              if a == account)  # fmt: skip
        wait_for(drained(backends, account, len(accepted)), 60, what=f"{account} stored")
        assert {d["event_id"] for d in backends.stored(account)} == set(accepted)
    wait_for(drained(backends, hot, len(hot_found[2])), 60, what="the hot account's 202s")
    assert {d["event_id"] for d in backends.stored(hot)} == set(hot_found[2])
