"""GET /timeseries over HTTP: every point equals the raw events of its step, and the points
add up to /summary's figures.

Events go in through the real app and a real flusher; the test rolls the
account itself (as the rollups process would at the next minute), so each
phase is deterministic: all from the live tail, after a rollover, with late
and re-sent events on top, after another rollover; then at chosen later
moments, with the head behind and after rolling to them. Ground truth is
counted here straight from the raw events in MongoDB, sharing no code with
the service.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core import keys
from core.buckets import HOUR, MINUTE, WINDOWS, floor, ms
from core.keys import partitions
from core.tail import read_tails
from rollups.rollover import Roller
from service.snapshot import Raced, Snapshot
from service.summary import figures_at
from service.timeseries import READ_BY_ID, timeline_at
from tests.conftest import AppFactory, Running
from tests.oracle import parse_iso
from tests.support import drained, eventually, iso, unique

Doc = dict[str, Any]
STEP_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000, "6h": 21_600_000,
           "1d": 86_400_000}  # fmt: skip
# every window, with its shortest allowed step and a coarser one
CASES = [("15m", "1m"), ("1h", "5m"), ("6h", "1m"), ("6h", "1h"), ("24h", "1m"), ("24h", "1h"),
         ("7d", "15m"), ("7d", "1d"), ("30d", "1h"), ("30d", "1d")]  # fmt: skip
TYPES = ["page_view", "login", "message_sent", "call_made"]


def event(account: str, n: int, ts: datetime) -> Doc:
    return {"event_id": f"e{n}", "account_id": account, "user_id": f"user_{n % 9}",
            "type": TYPES[n % len(TYPES) if n % 5 else 0], "timestamp": iso(ts)}  # fmt: skip


def spread(account: str, now: datetime, first: int, count: int) -> list[Doc]:
    """Events over the last three days (more hours than are read one by one), several per
    hour, plus ones exactly on minute, hour and day edges (±1 ms) and a few in the future."""
    out = []
    span = 3 * 24 * 3600
    for i in range(first, first + count):
        out.append(event(account, i, now - timedelta(seconds=30 + i * 7919 % span)))
    edges = []
    minute = now.replace(second=0, microsecond=0)
    for back in (
        timedelta(minutes=1),
        timedelta(minutes=16),
        timedelta(hours=1, minutes=1),
        timedelta(hours=6),
        timedelta(hours=24),
        timedelta(hours=25),
        timedelta(days=2),
    ):
        edge = minute - back
        edges += [edge, edge.replace(minute=0), edge.replace(hour=0, minute=0)]  # fmt: skip
    n = first + count
    for edge in edges:
        for delta in (-1, 0, 1):
            out.append(event(account, n, edge + timedelta(milliseconds=delta)))
            n += 1
    for ahead in (90, 200):  # accepted (up to 5 min ahead), counted once `to` passes them
        out.append(event(account, n, now + timedelta(seconds=ahead)))
        n += 1
    return out


async def store(running: Running, account: str, events: list[Doc], expected: int) -> None:
    for i in range(0, len(events), 100):
        response = await running.post(events[i : i + 100])
        assert response.status_code == 202, response.text
    await eventually(drained(running.backends, account, expected), what=f"{expected} stored")


def raw_events(running: Running, account: str) -> list[tuple[int, str]]:
    """(epoch ms, type) of every stored event of the account: the ground truth."""
    found = running.backends.events.find({"account_id": account}, {"timestamp": 1, "type": 1})
    return [(ms(doc["timestamp"]), doc["type"]) for doc in found]


def counted(raw: list[tuple[int, str]], start: int, end: int) -> tuple[int, dict[str, int]]:
    types: dict[str, int] = {}
    for ts, event_type in raw:
        if start <= ts < end:
            types[event_type] = types.get(event_type, 0) + 1
    return sum(types.values()), dict(sorted(types.items()))


def check_points(body: dict[str, Any], raw: list[tuple[int, str]], step: str) -> None:
    start, to = ms(parse_iso(body["from"])), ms(parse_iso(body["to"]))
    step_ms = STEP_MS[step]
    points = body["points"]
    assert len(points) == -(-(to - start) // step_ms), (body["window"], step)
    for i, point in enumerate(points):
        begin = start + i * step_ms
        assert ms(parse_iso(point["start"])) == begin
        total, types = counted(raw, begin, min(begin + step_ms, to))
        assert (point["total"], point["totals"]) == (total, types), (body["window"], step, i)
    assert body["total"] == sum(p["total"] for p in points)
    assert (body["total"], body["totals"]) == counted(raw, start, to)


async def check_all(running: Running, account: str) -> int:
    """Every case against raw events and /summary; returns the events counted in 30d."""
    raw = raw_events(running, account)
    for window, step in CASES:
        for _ in range(3):  # the minute may turn between the two requests: ask again
            series = await running.client.get(
                f"/timeseries/{account}", params={"window": window, "step": step}
            )
            assert series.status_code == 200, series.text
            body = series.json()
            assert (body["account_id"], body["window"], body["step"]) == (account, window, step)
            assert body["as_of"] == body["to"]
            summary = (await running.client.get(f"/summary/{account}",
                                                params={"window": window})).json()  # fmt: skip
            if summary["from"] == body["from"]:
                break
        else:
            raise AssertionError("the minute kept turning between /timeseries and /summary")
        check_points(body, raw, step)
        # same window: they differ only by what was stored between their two moments
        later, _ = counted(raw, ms(parse_iso(body["to"])), ms(parse_iso(summary["to"])))
        assert summary["total"] == body["total"] + later, (window, step)
        if not later:
            assert summary["totals"] == body["totals"], (window, step)
    return int(body["total"])


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


async def test_points_equal_raw_events_before_and_after_rollovers(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("series")
    first = spread(account, now, 0, 300)
    await store(running, account, first, len(first))
    assert running.backends.tail_events(account) == len(first)
    counted_30d = await check_all(running, account)  # nothing rolled: all from the tail
    assert counted_30d > 250
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, floor(ms(datetime.now(UTC)), "minute"))
    assert running.backends.db[keys.HOURS].count_documents({"account_id": account}) > READ_BY_ID
    await check_all(running, account)  # from the hour buckets' series
    # late events into hours already rolled up, plus re-sent ones (stored once)
    late = spread(account, now, 10_000, 120)
    await store(running, account, late + first[:40], len(first) + len(late))
    assert running.backends.tail_events(account) > 0
    await check_all(running, account)  # buckets + late tail
    await roller.roll(account, floor(ms(datetime.now(UTC)), "minute"))
    await check_all(running, account)


async def test_points_add_up_to_the_summary_at_any_moment(running: Running) -> None:
    """At chosen moments (the head behind them, then rolled to them) the series and the
    summary computed from one snapshot agree in total and per type, for every window."""
    now = datetime.now(UTC)
    account = unique("moment")
    events = spread(account, now, 0, 200)
    await store(running, account, events, len(events))
    roller = Roller(running.db, running.redis, running.settings)
    to = ms(now)
    await roller.roll(account, floor(to, "minute"))
    for later in (0, MINUTE, 7 * MINUTE, HOUR, 3 * HOUR, 20 * HOUR, 30 * HOUR):
        moment = to + later
        for rolled in (False, True):
            if rolled:
                await roller.roll(account, floor(moment, "minute"))
            for window, step in CASES:
                tail = await read_tails(running.redis, partitions(running.settings), account)
                snapshot = Snapshot(moment, tail.entries)
                series = await timeline_at(running.db, snapshot, account, window, step)
                figures = await figures_at(running.db, snapshot, account, window)
                body, summary = series.body(), figures.body(5)
                assert body["from"] == summary["from"]
                where = (later, rolled, window, step)
                assert (body["total"], body["totals"]) == (summary["total"], summary["totals"]), (
                    where
                )
                assert sum(p["total"] for p in body["points"]) == figures.total


async def test_a_series_racing_a_rollover_reads_again(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("race")
    events = spread(account, now, 0, 150)
    await store(running, account, events, len(events))
    minute = floor(ms(now), "minute")
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, minute + 2 * MINUTE)
    tail = await read_tails(running.redis, partitions(running.settings), account)
    with pytest.raises(Raced):  # the head is ahead of the reader's minute
        await timeline_at(running.db, Snapshot(ms(now), tail.entries), account, "1h", "5m")
    # a named hour bucket gone (superseded, then deleted by the next rollover): read again,
    # whether the hours are read one by one (24h) or all in one query (30d)
    later = Snapshot(minute + 2 * MINUTE, tail.entries)
    hours = running.backends.db[keys.HOURS]
    newest = max(hours.find({"account_id": account}), key=lambda d: d["start"])
    hours.delete_one({"_id": newest["_id"]})
    for window, step in (("24h", "1h"), ("30d", "1d")):
        with pytest.raises(Raced):
            await timeline_at(running.db, later, account, window, step)


async def test_defaults_and_an_unknown_account(running: Running) -> None:
    body = (await running.client.get(f"/timeseries/nobody_{unique('x')}")).json()
    assert (body["window"], body["step"], body["total"], body["totals"]) == ("24h", "15m", 0, {})
    assert len(body["points"]) in (96, 97)  # 97 once `to` is past the minute
    assert all(p["total"] == 0 and p["totals"] == {} for p in body["points"])
    for window, step in (("15m", "1m"), ("1h", "1m"), ("6h", "5m"), ("7d", "1h"), ("30d", "6h")):
        got = (await running.client.get("/timeseries/acc_d", params={"window": window})).json()
        assert got["step"] == step


@pytest.mark.parametrize(
    "params",
    [{"window": "2h"}, {"window": ""}, {"step": "2m"}, {"step": ""}, {"step": "5M"},
     {"window": "15m", "step": "1h"}, {"window": "1h", "step": "6h"},
     {"window": "7d", "step": "5m"}, {"window": "30d", "step": "15m"},
     {"step": "5m\x00"}, {"window": "24h\x00"}, {"step": "٥m"}],
)  # fmt: skip
async def test_bad_parameters_are_400(running: Running, params: dict[str, str]) -> None:
    response = await running.client.get("/timeseries/acc_1", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"


@pytest.mark.parametrize(
    "path", ["/timeseries/bad%20id", "/timeseries/" + "a" * 65, "/timeseries/%FF%FE",
             "/timeseries/a%0A"],
)  # fmt: skip
async def test_bad_account_is_400(running: Running, path: str) -> None:
    assert (await running.client.get(path)).status_code == 400


async def test_api_keys_guard_the_series(app: AppFactory) -> None:
    mine, other = unique("acc_a"), unique("acc_z")
    running = await app(api_keys=f"k_one={mine},k_all=*")
    running.start_flusher()
    now = datetime.now(UTC)
    batch = [event(mine, i, now - timedelta(minutes=i)) for i in range(5)]
    assert (await running.post(batch, headers={"x-api-key": "k_one"})).status_code == 202
    await eventually(drained(running.backends, mine, 5), what="5 stored")
    client = running.client
    missing = await client.get(f"/timeseries/{mine}")
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert (
        await client.get(f"/timeseries/{mine}", headers={"x-api-key": "nope"})
    ).status_code == 401
    forbidden = await client.get(f"/timeseries/{other}", headers={"x-api-key": "k_one"})
    assert forbidden.status_code == 403 and forbidden.json()["accounts"] == [other]
    for headers in ({"x-api-key": "k_one"}, {"authorization": "Bearer k_one"},
                    {"x-api-key": "k_all"}):  # fmt: skip
        ok = await client.get(f"/timeseries/{mine}", params={"window": "1h"}, headers=headers)
        assert ok.status_code == 200 and ok.json()["total"] == 5, headers


def test_every_window_has_a_default_step_that_divides_it() -> None:
    from service.timeseries import DEFAULT_STEPS, MAX_POINTS, STEPS

    assert set(DEFAULT_STEPS) == set(WINDOWS)
    for window, step in DEFAULT_STEPS.items():
        assert WINDOWS[window] % STEPS[step] == 0 and WINDOWS[window] // STEPS[step] <= MAX_POINTS
    assert {s: STEPS[s] for s in STEP_MS} == STEP_MS


async def test_the_routes_are_in_the_openapi_document(running: Running) -> None:
    paths = (await running.client.get("/docs/openapi.json")).json()["paths"]
    names = {p["name"] for p in paths["/timeseries/{account_id}"]["get"]["parameters"]}
    assert {"account_id", "window", "step"} <= names
    assert "get" in paths["/dashboard"]


async def test_series_are_cached_and_a_newly_stored_event_is_never_hidden(
    app: AppFactory,
) -> None:
    running = await app(summary_cache_seconds=60)
    running.start_flusher()
    account = unique("cached")
    now = datetime.now(UTC)
    await store(running, account, [event(account, i, now - timedelta(minutes=i)) for i in range(5)],
                5)  # fmt: skip
    params = {"window": "1h", "step": "5m"}

    async def second_is_a_hit() -> bool:  # the minute may turn between two requests
        first = await running.client.get(f"/timeseries/{account}", params=params)
        again = await running.client.get(f"/timeseries/{account}", params=params)
        return again.headers["x-cache"] == "hit" and again.content == first.content

    await eventually(second_is_a_hit, 10, what="a cached series")
    cached = await running.client.get(f"/timeseries/{account}", params=params)
    assert cached.headers["x-cache"] == "hit" and cached.json()["total"] == 5
    await store(running, account, [event(account, 99, now - timedelta(minutes=30))], 6)
    fresh = await running.client.get(f"/timeseries/{account}", params=params)
    assert fresh.headers["x-cache"] == "miss", "the cache must be keyed by what is stored"
    check_points(fresh.json(), raw_events(running, account), "5m")
    assert fresh.json()["total"] == 6


async def test_a_30d_series_reads_the_windows_hours_once_then_only_new_ones(
    app: AppFactory,
) -> None:
    """Hour buckets older than the window are never read, and a worker keeps the hour
    buckets it read (they are immutable): the next series reads only what is new."""
    running = await app(raw_retention_days=40, summary_cache_seconds=0)
    running.start_flusher()
    account = unique("bounded")
    now = datetime.now(UTC)
    older = [event(account, i, now - timedelta(days=31, hours=i)) for i in range(120)]
    within = [event(account, 1000 + i, now - timedelta(hours=2 + 7 * i)) for i in range(60)]
    await store(running, account, older + within, 180)
    roller = Roller(running.db, running.redis, running.settings)
    await roller.roll(account, floor(ms(datetime.now(UTC)), "minute"))
    hours = running.backends.db[keys.HOURS]
    assert hours.count_documents({"account_id": account}) == 180  # one hour each

    async def series() -> tuple[int, dict[str, Any]]:
        """Store documents read for a 30d series, and its body (checked point by point)."""
        response = await running.client.get(
            f"/timeseries/{account}", params={"window": "30d", "step": "1d"}
        )
        assert response.status_code == 200, response.text
        check_points(response.json(), raw_events(running, account), "1d")
        return int(response.headers["x-documents-read"]), response.json()

    read, body = await series()
    assert body["total"] == 60
    # the head came with the tail (its Redis copy), then its bucket index and the 60
    # hours of the window in one query; not the 120 older ones (it read the head from
    # the store, the index and all 180 hours: 182 documents, before)
    assert read == 1 + 60, read
    read, _ = await series()
    assert read == 0, "every document is in the worker's memory now"
    late = [event(account, 5000, now - timedelta(hours=5))]  # an hour without a bucket yet
    await store(running, account, late, 181)
    await roller.roll(account, floor(ms(datetime.now(UTC)), "minute"))
    read, body = await series()
    assert body["total"] == 61
    assert read == 2, "the new head's bucket index and the one new hour"
