"""Invariant 3 over HTTP: every /summary figure equals the same figure computed from raw events.

Property-based: several accounts, duplicates, late and out-of-order arrivals,
timestamps exactly on minute, hour and window edges (±1 ms), slightly in the
future; asked before the rollups hold the events (all from the live tail),
after a rollover, after late arrivals, and after another rollover. The app runs
in-process; the test rolls the accounts itself (the rollups process would do
it at the next minute) so each phase is deterministic.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core import keys
from core.buckets import MINUTE, WINDOWS, floor, ms
from rollups.rollover import Roller
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, iso, make_event, unique, wait_for

# shrinking re-runs real traffic for minutes; the failing example is printed anyway
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


def edge_times(now: datetime) -> list[datetime]:
    """Instants on the boundaries the summary has to get exactly right."""
    minute = now.replace(second=0, microsecond=0)
    hour = minute.replace(minute=0)
    picks = [minute, minute - timedelta(minutes=1), hour, hour - timedelta(hours=1)]
    for length in WINDOWS.values():
        edge = now - min(timedelta(milliseconds=length), timedelta(days=6, hours=20))
        e_min = edge.replace(second=0, microsecond=0)
        e_hour = e_min.replace(minute=0)
        picks += [e_min, e_min + timedelta(minutes=1), e_hour, e_hour + timedelta(hours=1)]
    return [p for p in picks if now - timedelta(days=6, hours=22) < p < now + timedelta(minutes=4)]


@st.composite
def event_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    edges = edge_times(now)
    accounts = [unique("sum") for _ in range(draw(st.integers(1, 3)))]
    users = [f"user_{i}" for i in range(draw(st.integers(1, 6)))] + ["user.with.dots", "$u", "ü"]
    offsets = st.one_of(
        st.sampled_from(edges).flatmap(
            lambda e: st.sampled_from([e, e - timedelta(milliseconds=1),
                                       e + timedelta(milliseconds=1)])),
        st.integers(0, 6 * 24 * 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(0, 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(1, 240).map(lambda s: now + timedelta(seconds=s)),  # slightly future
    )  # fmt: skip
    events = []
    for n in range(draw(st.integers(1, 60))):
        ts = draw(offsets).replace(microsecond=0) + timedelta(
            milliseconds=draw(st.sampled_from([0, 0, 1, 999]))
        )
        events.append({
            "event_id": f"e{n}",
            "account_id": draw(st.sampled_from(accounts)),
            "user_id": draw(st.sampled_from(users)),
            "type": draw(st.sampled_from(["page_view", "message_sent", "call_made", "login"])),
            "timestamp": iso(ts),
        })  # fmt: skip
    return events


async def check_all_windows(running: Running, accounts: set[str]) -> None:
    for account in sorted(accounts):
        for window in WINDOWS:
            for top in (3, 100):
                params = {"window": window, "top": top}
                response = await running.client.get(f"/summary/{account}", params=params)
                assert response.status_code == 200, response.text
                got = response.json()
                start, end = parse_iso(got["from"]), parse_iso(got["to"])
                expected = ground_truth(running.backends.events, account, start, end, top)
                assert figures(got) == expected, (window, top, got["from"], got["to"])


async def post_all(running: Running, events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 25):
        response = await running.post(events[i : i + 25])
        assert response.status_code == 202, response.text


async def stored(running: Running, events: list[dict[str, Any]]) -> None:
    for account in {e["account_id"] for e in events}:
        expected = len({e["event_id"] for e in events if e["account_id"] == account})
        await eventually(drained(running.backends, account, expected), what=f"{account} stored")


async def roll(running: Running, accounts: set[str]) -> None:
    roller = Roller(running.db, running.redis, running.settings)
    minute = floor(ms(datetime.now(UTC)), "minute")
    for account in accounts:
        await roller.roll(account, minute)


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


@pytest.fixture
async def partitioned(app: AppFactory) -> Running:
    """Accounts spread over 4 rollup partitions (rollups/lease.py)."""
    started = await app(rollup_partitions=4)
    started.start_flusher()
    return started


async def exact_through_rollovers(
    running: Running, events: list[dict[str, Any]], seed: int
) -> None:
    accounts = {e["account_id"] for e in events}
    rng = random.Random(seed)
    phase_one = events[: len(events) // 2 + 1]
    rng.shuffle(phase_one)
    await post_all(running, phase_one)
    await stored(running, phase_one)
    await check_all_windows(running, accounts)  # all from the live tail
    await roll(running, accounts)
    await check_all_windows(running, accounts)  # from the aggregates
    # late, out-of-order and duplicate arrivals into minutes already rolled up
    phase_two = events[len(events) // 2 + 1 :] + rng.sample(phase_one, min(5, len(phase_one)))
    rng.shuffle(phase_two)
    await post_all(running, phase_two)
    await stored(running, events)
    await check_all_windows(running, accounts)  # aggregates + tail
    await roll(running, accounts)
    await check_all_windows(running, accounts)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(events=event_sets(), seed=st.integers(0, 2**16))
async def test_summary_equals_ground_truth_for_every_window(
    running: Running, events: list[dict[str, Any]], seed: int
) -> None:
    await exact_through_rollovers(running, events, seed)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(events=event_sets(), seed=st.integers(0, 2**16))
async def test_summary_equals_ground_truth_with_rollup_partitions(
    partitioned: Running, events: list[dict[str, Any]], seed: int
) -> None:
    await exact_through_rollovers(partitioned, events, seed)


async def test_unknown_account_is_all_zeros(running: Running) -> None:
    got = (await running.client.get(f"/summary/nobody_{unique('x')}")).json()
    assert figures(got) == {"total": 0, "totals": {}, "unique_users": 0, "top_users": []}
    assert got["window"] == "24h"
    assert parse_iso(got["to"]) - parse_iso(got["from"]) < timedelta(hours=24, minutes=1)


async def test_query_form_is_the_same_endpoint(running: Running) -> None:
    got = await running.client.get("/summary", params={"account_id": "acc_q", "window": "1h"})
    assert got.status_code == 200
    assert got.json()["account_id"] == "acc_q" and got.json()["window"] == "1h"


async def test_windows_report_the_range_they_counted(running: Running) -> None:
    for window, length in WINDOWS.items():
        got = (await running.client.get("/summary/acc_w", params={"window": window})).json()
        start, end, as_of = parse_iso(got["from"]), parse_iso(got["to"]), parse_iso(got["as_of"])
        assert as_of == end
        minute = end.replace(second=0, microsecond=0)
        expected = minute - timedelta(milliseconds=length)
        if length > 24 * 3600 * 1000:
            expected = expected.replace(minute=0)
        assert start == expected


@pytest.mark.parametrize(
    "params",
    [{"window": "2h"}, {"window": ""}, {"top": "0"}, {"top": "101"}, {"top": "abc"},
     {"top": "-1"}, {"top": "5.5"}, {"top": "²"}, {"top": "٣"}, {"top": "1e2"},
     {"window": "24h\x00"}, {"top": ""}, {"top": " 5"}, {"top": "+5"}, {"top": "0x5"},
     {"top": "9" * 4301}, {"top": "0" * 5000 + "5"}, {"top": "0005"}],
)  # fmt: skip
async def test_bad_parameters_are_400(running: Running, params: dict[str, str]) -> None:
    """4,301 nines, or 5,000 zeros and a 5: int() refuses over 4,300 digits (a 500 before)."""
    response = await running.client.get("/summary/acc_1", params=params)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    if "top" in params:
        assert response.json()["field"] == "top"


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(top=st.text(max_size=5) | st.integers(-10, 1000).map(str)
       | st.from_regex(r"0{0,3}[0-9]{1,3}", fullmatch=True))  # fmt: skip
async def test_top_is_one_to_three_ascii_digits_from_1_to_100(running: Running, top: str) -> None:
    response = await running.client.get("/summary/acc_1", params={"top": top})
    valid = len(top) <= 3 and top.isascii() and top.isdigit() and 1 <= int(top) <= 100
    assert response.status_code == (200 if valid else 400), (top, response.text)
    if valid:
        assert len(response.json()["top_users"]) <= int(top)


@pytest.mark.parametrize(
    "path", ["/summary/bad%20id", "/summary/" + "a" * 65, "/summary", "/summary/%FF%FE",
             "/summary/a%0A"],
)  # fmt: skip
async def test_bad_account_is_400(running: Running, path: str) -> None:
    response = await running.client.get(path)
    assert response.status_code == 400


async def test_cached_answers_never_hide_a_newly_stored_event(app: AppFactory) -> None:
    running = await app(summary_cache_seconds=60)
    running.start_flusher()
    account = unique("cache")
    first = await running.client.get(f"/summary/{account}")
    assert first.headers["x-cache"] == "miss" and first.json()["total"] == 0

    async def second_is_a_hit() -> bool:  # the minute may turn between two requests
        await running.client.get(f"/summary/{account}")
        return (await running.client.get(f"/summary/{account}")).headers["x-cache"] == "hit"

    await eventually(second_is_a_hit, 10, what="a cached answer")
    five_minutes_ago = iso(datetime.now(UTC) - timedelta(minutes=5))
    event = {"event_id": "e1", "account_id": account, "user_id": "u", "type": "login",
             "timestamp": five_minutes_ago}  # fmt: skip
    assert (await running.post([event])).status_code == 202
    await eventually(drained(running.backends, account, 1))
    fresh = await running.client.get(f"/summary/{account}")
    assert fresh.json()["total"] == 1, "the cache must be keyed by what is stored"


async def exact_summary(running: Running, account: str, window: str) -> httpx.Response:
    """GET /summary, asserting its figures equal the raw events' over the range it reports."""
    response = await running.client.get(f"/summary/{account}", params={"window": window})
    got = response.json()
    start, end = parse_iso(got["from"]), parse_iso(got["to"])
    assert figures(got) == ground_truth(running.backends.events, account, start, end, 5)
    return response


def minute_of_to(response: httpx.Response) -> int:
    return floor(ms(parse_iso(response.json()["to"])), "minute")


async def test_a_worker_new_to_an_account_finds_another_workers_answer_in_redis(
    app: AppFactory,
) -> None:
    """Answers are cached in Redis too: a worker (or host) that holds no count of the
    account yet takes another's answer instead of counting the whole tail."""
    first = await app(summary_cache_seconds=60)
    second = await app(summary_cache_seconds=60, mongo_db=first.settings.mongo_db,
                       stream_key=first.settings.stream_key)  # fmt: skip
    first.start_flusher()

    async def shared() -> bool:  # the minute may turn between the two requests
        account = unique("shared")
        assert (await first.post([make_event(account, 0)])).status_code == 202
        await eventually(drained(first.backends, account, 1), what="stored")
        a = await first.client.get(f"/summary/{account}")
        b = await second.client.get(f"/summary/{account}")
        assert a.json()["total"] == 1
        return (
            a.headers["x-cache"] == "miss"
            and b.headers["x-cache"] == "hit"
            and a.content == b.content
        )

    await eventually(shared, 30, what="the second worker answered from Redis")


async def test_a_worker_reads_only_the_tail_stored_since_its_last_summary(
    app: AppFactory,
) -> None:
    """Under load an account's tail is thousands of entries; each summary reads only
    what was stored since the worker's last one, through a same-minute rollover
    that applies late events too, and stays exact (service/tail_counts.py)."""
    running = await app(summary_cache_seconds=0)
    running.start_flusher()
    roller = Roller(running.db, running.redis, running.settings)

    async def post(account: str, first: int, n: int, ago: timedelta) -> int:
        when = datetime.now(UTC) - ago
        batch = [make_event(account, first + i, user=f"u{i % 3}", ts=when) for i in range(n)]
        assert (await running.post(batch)).status_code == 202
        await eventually(drained(running.backends, account, first + n), what="stored")
        return floor(ms(when), "minute")

    async def summary(account: str) -> tuple[int, int]:
        """Tail events read, and the minute of `to`; the figures must be exact."""
        response = await exact_summary(running, account, "1h")
        return int(response.headers["x-tail-events-read"]), minute_of_to(response)

    async def within_one_minute() -> list[int] | None:
        account = unique("inc")
        minute = await post(account, 0, 10, timedelta(0))
        await roller.roll(account, minute)  # a head for this minute; the tail stays
        reads = []
        for step in range(4):
            if step == 1:
                await post(account, 10, 5, timedelta(seconds=1))
            elif step == 2:
                await post(account, 15, 1, timedelta(minutes=3))  # late
            elif step == 3:
                await roller.roll(account, minute)  # same minute: applies the late event
            read, to_minute = await summary(account)
            if to_minute != minute:
                return None  # the minute turned: the counts start afresh; try again
            reads.append(read)
        return reads

    for _ in range(3):
        if (reads := await within_one_minute()) is not None:
            break
    assert reads == [10, 5, 1, 0]


async def test_a_summary_reads_the_head_copy_with_the_tail_and_nothing_from_the_store(
    app: AppFactory,
) -> None:
    """Each head the rollup job stores is copied to Redis (newer versions only) and a
    summary reads it with the tail in one call: once the aggregate is in the worker's
    memory, a summary reads no store document. Without a copy, or with one naming
    documents that are gone, it reads the head from the store, exact either way."""
    running = await app(summary_cache_seconds=0)
    running.start_flusher()
    roller = Roller(running.db, running.redis, running.settings)
    copy_key = ""

    async def summary(account: str) -> tuple[int, int]:
        """Store documents read, and the minute of `to`; the figures must be exact."""
        response = await exact_summary(running, account, "24h")
        return int(response.headers["x-documents-read"]), minute_of_to(response)

    async def kept_version() -> int:
        return int(await running.redis.hget(copy_key, "v") or 0)

    async def within_one_minute() -> list[int] | None:
        nonlocal copy_key
        account = unique("copy")
        copy_key = keys.head_copy(running.settings, account)
        when = datetime.now(UTC) - timedelta(minutes=2)
        batch = [make_event(account, i, user=f"u{i % 4}", ts=when) for i in range(20)]
        assert (await running.post(batch)).status_code == 202
        await eventually(drained(running.backends, account, 20), what="stored")
        minute = floor(ms(datetime.now(UTC)), "minute")
        rolled = await roller.roll(account, minute)
        assert rolled is not None and await kept_version() == rolled.head.version
        reads = []
        for step in range(4):
            if step == 2:
                await running.redis.delete(copy_key)  # no copy: the head from the store
            elif step == 3:  # a copy naming an aggregate that is gone (a restored store)
                gone = dataclasses.replace(rolled.head, version=rolled.head.version + 100,
                                           windows={"24h": "gone"})  # fmt: skip
                await running.redis.hset(copy_key, mapping={"v": gone.version, "h": gone.copy()})
            read, to_minute = await summary(account)
            if to_minute != minute:
                return None  # the minute turned: buckets are read too; try again
            reads.append(read)
        # a rollover never puts back an older version than the copy holds
        assert (await roller.roll(account, minute + MINUTE)) is not None
        assert await kept_version() == rolled.head.version + 100
        return reads

    for _ in range(3):
        if (reads := await within_one_minute()) is not None:
            break
    # the aggregate, then nothing; the head from the store twice (the last after a try
    # that raced on the copy's missing aggregate)
    assert reads == [1, 0, 1, 1]


async def test_a_worker_reads_a_heads_bucket_index_once(app: AppFactory) -> None:
    """Until the rollup job rolls an account into the current minute, a summary
    also needs the head's bucket index (which buckets left the window since);
    a worker keeps it in memory with the other immutable documents."""
    running = await app(summary_cache_seconds=0)
    running.start_flusher()
    account = unique("idx")
    now = datetime.now(UTC)
    events = [make_event(account, i, user=f"u{i % 3}", ts=now - timedelta(minutes=3))
              for i in range(10)]  # fmt: skip
    assert (await running.post(events)).status_code == 202
    await eventually(drained(running.backends, account, 10), what="stored")
    roller = Roller(running.db, running.redis, running.settings)
    assert await roller.roll(account, floor(ms(now), "minute") - MINUTE)  # a minute behind
    reads = []
    for _ in range(2):
        response = await exact_summary(running, account, "24h")
        reads.append(int(response.headers["x-documents-read"]))
    assert reads == [2, 0]  # the aggregate and the index, then both from memory


def test_rollups_processes_killed_and_running_twice_stay_exact(
    start_service: ServiceFactory,
) -> None:
    """Two services share one database (two rollups processes, one lease); both
    rollups processes are SIGKILLed while traffic flows; once the next minute's
    rollover has run, the figures are exact."""
    first, backends = start_service(rollup_interval_seconds=0.5)
    second, _ = start_service(rollup_interval_seconds=0.5, roles="http,rollups",
                              mongo_db=backends.db_name, stream_key=backends.stream)  # fmt: skip
    accounts = [unique("kill") for _ in range(3)]
    now = datetime.now(UTC)
    sent: dict[str, int] = dict.fromkeys(accounts, 0)
    for round_ in range(6):
        batch = [{"event_id": f"r{round_}e{i}", "account_id": accounts[i % 3],
                  "user_id": f"u{i % 5}", "type": "login",
                  "timestamp": iso(now - timedelta(minutes=i * 37 % 1500))}
                 for i in range(60)]  # fmt: skip
        assert httpx.post(f"{first.url}/events", json=batch).status_code == 202
        for event in batch:
            sent[event["account_id"]] += 1
        for service in (first, second):
            for pid in service.pids_titled("rollups"):
                os.kill(pid, signal.SIGKILL)
    for account, count in sent.items():
        wait_for(drained(backends, account, count), what="all events stored")
    wait_for(lambda: all(len(s.pids_titled("rollups")) == 1 for s in (first, second)),
             20, what="both rollups processes restarted")  # fmt: skip
    progress = keys.rollup_progress(backends.settings, 0)
    target = floor(ms(datetime.now(UTC)), "minute") + 60_000
    wait_for(lambda: int(backends.redis.get(progress) or 0) >= target, 90, 0.5,
             what="a rollover after the traffic")  # fmt: skip
    for account in accounts:
        assert backends.tail_events(account) == 0  # all in the aggregates now
        for window in WINDOWS:
            got = httpx.get(f"{first.url}/summary/{account}", params={"window": window}).json()
            truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                                 parse_iso(got["to"]), 5)  # fmt: skip
            assert figures(got) == truth, window


@pytest.mark.parametrize("route", ["summary", "timeseries"])
async def test_a_second_rollover_in_the_same_minute_never_brings_back_an_older_answer(
    app: AppFactory, route: str
) -> None:
    """A rollover trims the tail; a second one in the same minute (late events arrived)
    trims it back to what it was after the first. The answer cached after the first
    must not come back: the head's version is part of every cache key."""
    running = await app(summary_cache_seconds=60)
    running.start_flusher()
    roller = Roller(running.db, running.redis, running.settings)

    async def total(account: str) -> tuple[int, int]:
        """The answer's total (exact: checked against the raw events) and its minute."""
        response = await running.client.get(f"/{route}/{account}")
        assert response.status_code == 200, response.text
        got = response.json()
        start, end = parse_iso(got["from"]), parse_iso(got["to"])
        expected = ground_truth(running.backends.events, account, start, end, 5)
        assert got["total"] == expected["total"], (route, got["total"], expected)
        return got["total"], minute_of_to(response)

    async def within_one_minute() -> bool:
        account = unique("again")
        minute = floor(ms(datetime.now(UTC)), "minute")
        late = datetime.now(UTC) - timedelta(minutes=3)
        minutes = []
        for n in range(2):
            assert (await running.post([make_event(account, n, ts=late)])).status_code == 202
            await eventually(drained(running.backends, account, n + 1), what="stored")
            assert await roller.roll(account, minute) is not None
            assert running.backends.tail_entries(account) == 0  # trimmed: as after the first
            counted, to_minute = await total(account)
            assert counted == n + 1
            minutes.append(to_minute)
        return minutes == [minute, minute]  # else the minute turned: try again

    for _ in range(3):
        if await within_one_minute():
            break
    else:
        raise AssertionError("the minute kept turning")
