"""Invariant 3: every /summary figure equals the same figure computed from raw events.

Property-based over real traffic through the real service: several accounts,
duplicates, late and out-of-order arrivals, timestamps exactly on minute and
hour edges and on window edges, queried both before the rollup job has seen
the events (live tail) and after (buckets).
"""

from __future__ import annotations

import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rollups.buckets import WINDOWS, floor
from tests.conftest import ServiceFactory
from tests.rollup_support import figures, ground_truth, parse_iso
from tests.support import Backends, Service, drained, iso, unique, wait_for

# shrinking re-runs real traffic for minutes; the failing example is printed anyway
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]

FAST_ROLLUPS = {
    "rollup_interval_seconds": 0.5,
    "rollup_safety_lag_seconds": 2.5,
    "mongo_timeout_ms": 2000,
    "summary_cache_seconds": 0,
}


@pytest.fixture(scope="module")
def rolled(start_service: ServiceFactory) -> tuple[Service, Backends]:
    return start_service(**FAST_ROLLUPS)


def edge_times(now: datetime) -> list[datetime]:
    """Instants on the boundaries the summary has to get exactly right."""
    minute, hour = floor(now, "minute"), floor(now, "hour")
    picks = [minute, minute - timedelta(minutes=1), hour, hour - timedelta(hours=1)]
    for length in WINDOWS.values():
        length = min(length, timedelta(days=6, hours=20))  # inside raw retention
        edge = now - length
        picks += [floor(edge, "minute"), floor(edge, "minute") + timedelta(minutes=1),
                  floor(edge, "hour"), floor(edge, "hour") + timedelta(hours=1)]  # fmt: skip
    return [p for p in picks if now - timedelta(days=6, hours=22) < p < now + timedelta(minutes=4)]


@st.composite
def event_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    edges = edge_times(now)
    accounts = [unique("sum") for _ in range(draw(st.integers(1, 3)))]
    users = [f"user_{i}" for i in range(draw(st.integers(1, 6)))] + ["user.with.dots", "$u"]
    offsets = st.one_of(
        st.sampled_from(edges).flatmap(
            lambda e: st.sampled_from([e, e - timedelta(milliseconds=1),
                                       e + timedelta(milliseconds=1)])),
        st.integers(0, 6 * 24 * 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(0, 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(1, 240).map(lambda s: now + timedelta(seconds=s)),  # slightly future
    )  # fmt: skip
    count = draw(st.integers(1, 60))
    events = []
    for n in range(count):
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


def watermark(backends: Backends) -> datetime | None:
    doc = backends.mongo[backends.db_name]["rollup_state"].find_one({"_id": "watermark"})
    return doc["value"] if doc else None


def wait_rolled_up(backends: Backends, accounts: set[str]) -> None:
    latest = max(
        doc["ingested_at"]
        for doc in backends.events.find({"account_id": {"$in": list(accounts)}}, {"ingested_at": 1})
    )
    wait_for(lambda: (w := watermark(backends)) is not None and w >= latest, 30,
             what="the rollup watermark to pass the events")  # fmt: skip


def check_all_windows(service: Service, backends: Backends, accounts: set[str]) -> None:
    for account in sorted(accounts):
        for window in WINDOWS:
            for top in (3, 100):
                response = httpx.get(f"{service.url}/summary/{account}",
                                     params={"window": window, "top": top})  # fmt: skip
                assert response.status_code == 200, response.text
                got = response.json()
                start, end = parse_iso(got["from"]), parse_iso(got["to"])
                expected = ground_truth(backends.events, account, start, end, top)
                assert figures(got) == expected, (window, top, got["from"], got["to"])


def post_all(service: Service, events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 25):
        response = service.post(events[i : i + 25])
        assert response.status_code == 202, response.text


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(first=event_sets(), seed=st.integers(0, 2**16))
def test_summary_equals_ground_truth_for_every_window(
    rolled: tuple[Service, Backends], first: list[dict[str, Any]], seed: int
) -> None:
    service, backends = rolled
    accounts = {e["account_id"] for e in first}
    rng = random.Random(seed)
    phase_one = first[: len(first) // 2 + 1]
    rng.shuffle(phase_one)
    post_all(service, phase_one)
    for account in accounts:
        expected = len({e["event_id"] for e in phase_one if e["account_id"] == account})
        wait_for(drained(backends, account, expected), what="phase one stored")
    check_all_windows(service, backends, accounts)  # mostly the live tail
    wait_rolled_up(backends, accounts)
    check_all_windows(service, backends, accounts)  # from buckets
    # late, out-of-order and duplicate arrivals into minutes already rolled up
    phase_two = first[len(first) // 2 + 1 :] + rng.sample(phase_one, min(5, len(phase_one)))
    rng.shuffle(phase_two)
    post_all(service, phase_two)
    for account in accounts:
        expected = len({e["event_id"] for e in first if e["account_id"] == account})
        wait_for(drained(backends, account, expected), what="phase two stored")
    check_all_windows(service, backends, accounts)  # buckets + tail
    wait_rolled_up(backends, accounts)
    check_all_windows(service, backends, accounts)


def test_unknown_account_is_all_zeros(rolled: tuple[Service, Backends]) -> None:
    service, _ = rolled
    got = httpx.get(f"{service.url}/summary/nobody_{unique('x')}").json()
    assert figures(got) == {"total": 0, "totals": {}, "unique_users": 0, "top_users": []}
    assert got["window"] == "24h"
    assert parse_iso(got["to"]) - parse_iso(got["from"]) < timedelta(hours=24, minutes=1)


def test_query_form_is_the_same_endpoint(rolled: tuple[Service, Backends]) -> None:
    service, _ = rolled
    got = httpx.get(f"{service.url}/summary", params={"account_id": "acc_q", "window": "1h"})
    assert got.status_code == 200
    assert got.json()["account_id"] == "acc_q" and got.json()["window"] == "1h"


def test_windows_report_the_range_they_counted(rolled: tuple[Service, Backends]) -> None:
    service, _ = rolled
    for window, length in WINDOWS.items():
        got = httpx.get(f"{service.url}/summary/acc_w", params={"window": window}).json()
        start, end, as_of = parse_iso(got["from"]), parse_iso(got["to"]), parse_iso(got["as_of"])
        assert as_of == end
        unit = "minute" if length <= timedelta(hours=24) else "hour"
        assert start == floor(end - length, unit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "params",
    [{"window": "2h"}, {"window": ""}, {"top": "0"}, {"top": "101"}, {"top": "abc"},
     {"top": "-1"}, {"top": "5.5"}],
)  # fmt: skip
def test_bad_parameters_are_400(rolled: tuple[Service, Backends], params: dict[str, str]) -> None:
    service, _ = rolled
    response = httpx.get(f"{service.url}/summary/acc_1", params=params)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


@pytest.mark.parametrize("path", ["/summary/bad%20id", "/summary/" + "a" * 65, "/summary"])
def test_bad_account_is_400(rolled: tuple[Service, Backends], path: str) -> None:
    service, _ = rolled
    response = httpx.get(f"{service.url}{path}")
    assert response.status_code == 400


def test_cached_answers_never_hide_a_new_watermark(start_service: ServiceFactory) -> None:
    service, backends = start_service(**{**FAST_ROLLUPS, "summary_cache_seconds": 60})
    account = unique("cache")
    first = httpx.get(f"{service.url}/summary/{account}")
    assert first.headers["x-cache"] == "miss"
    assert first.json()["total"] == 0

    def second_is_a_hit() -> bool:  # the watermark may move between two requests
        httpx.get(f"{service.url}/summary/{account}")
        return httpx.get(f"{service.url}/summary/{account}").headers["x-cache"] == "hit"

    wait_for(second_is_a_hit, 10, what="a cached answer for an unchanged watermark")
    five_minutes_ago = iso(datetime.now(UTC) - timedelta(minutes=5))
    event = {"event_id": "e1", "account_id": account, "user_id": "u", "type": "login",
             "timestamp": five_minutes_ago}  # fmt: skip
    assert service.post([event]).status_code == 202
    wait_for(drained(backends, account, 1))
    wait_rolled_up(backends, {account})
    fresh = httpx.get(f"{service.url}/summary/{account}")
    assert fresh.json()["total"] == 1, "the cache must be keyed by the watermark"


def test_schedulers_killed_mid_run_and_running_twice_stay_exact(
    start_service: ServiceFactory,
) -> None:
    """Two services share one database (two rollups processes, one lease);
    the rollups processes are SIGKILLed while traffic flows; figures stay exact."""
    first, backends = start_service(**FAST_ROLLUPS)
    second, _ = start_service(**FAST_ROLLUPS, run_flusher=False, mongo_db=backends.db_name,
                              stream_key=backends.stream)  # fmt: skip
    accounts = [unique("kill") for _ in range(3)]
    now = datetime.now(UTC)
    sent: dict[str, int] = dict.fromkeys(accounts, 0)
    for round_ in range(6):
        batch = [{"event_id": f"r{round_}e{i}", "account_id": accounts[i % 3],
                  "user_id": f"u{i % 5}", "type": "login",
                  "timestamp": iso(now - timedelta(minutes=i * 37 % 1500))}
                 for i in range(60)]  # fmt: skip
        post_all(first, batch)
        for event in batch:
            sent[event["account_id"]] += 1
        for service in (first, second):
            for pid in service.pids_titled("rollups"):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)  # let the restarted schedulers get partway into a run
    for account, count in sent.items():
        wait_for(drained(backends, account, count), what="all events stored")
    wait_for(lambda: all(len(s.pids_titled("rollups")) == 1 for s in (first, second)),
             20, what="both schedulers restarted")  # fmt: skip
    wait_rolled_up(backends, set(accounts))
    check_all_windows(first, backends, set(accounts))


def test_recent_copy_off_then_on_stays_exact(start_service: ServiceFactory) -> None:
    """RECENT_COPY=false writes no second copy; turning it on later must not make
    readers trust an events_recent that misses what arrived while it was off."""
    account = unique("acc")
    slow_rollups = {**FAST_ROLLUPS, "rollup_interval_seconds": 3600}  # keep W back: all tail
    off, backends = start_service(**slow_rollups, recent_copy=False)
    db = backends.mongo[backends.db_name]
    now = datetime.now(UTC)
    first = [make_event_at(account, i, now - timedelta(seconds=30 + i)) for i in range(20)]
    post_all(off, first)
    wait_for(drained(backends, account, 20), what="the first events stored")
    assert db["events_recent"].count_documents({}) == 0
    assert db["service_state"].find_one({"_id": "recent_copy"}) is None
    check_all_windows(off, backends, {account})
    off.stop()
    on, _ = start_service(**slow_rollups, mongo_db=backends.db_name,
                          stream_key=backends.stream)  # fmt: skip
    wait_for(lambda: db["service_state"].find_one({"_id": "recent_copy"}), what="the marker")
    second = [make_event_at(account, 100 + i, datetime.now(UTC)) for i in range(10)]
    post_all(on, second)
    wait_for(drained(backends, account, 30), what="the second events stored")
    assert db["events_recent"].count_documents({"account_id": account}) == 10
    check_all_windows(on, backends, {account})  # the first 20 must still count


def make_event_at(account: str, n: int, ts: datetime) -> dict[str, Any]:
    return {"event_id": f"e{n}", "account_id": account, "user_id": f"u{n % 3}",
            "type": "login", "timestamp": iso(ts)}  # fmt: skip
