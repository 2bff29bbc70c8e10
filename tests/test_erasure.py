"""Invariant 7: after an erasure no figure, export or stream includes the erased events,
queued ones included; erasures are idempotent, resumable and audited.

Against the real servers: the app in-process with a real flusher (the test rolls
accounts itself, as the rollups process would), and real processes where a
process is killed or the rollups process must run beside the erasure. After
every erasure each window of /summary and /timeseries is checked against the
raw events (``tests/oracle.py``, which shares no code with the service), and
the raw events against the test's own record of what was sent minus what was
erased, so "ground truth without the erased events" is checked both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import keys
from core.buckets import WINDOWS, floor, ms
from rollups.lease import Leases, holder
from rollups.rollover import Roller
from scripts.stack import ROOT
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import drained, eventually, iso, unique, wait_for
from tests.test_summary import NO_SHRINK
from tests.test_timeseries import CASES, check_points, raw_events

Doc = dict[str, Any]
TYPES = ["page_view", "login", "message_sent", "call_made"]


def event(account: str, n: int, user: str, ts: datetime, type_: str = "login") -> Doc:
    return {"event_id": f"e{n}", "account_id": account, "user_id": user, "type": type_,
            "timestamp": iso(ts)}  # fmt: skip


async def post_all(running: Running, events: list[Doc]) -> None:
    for i in range(0, len(events), 200):
        response = await running.post(events[i : i + 200])
        assert response.status_code == 202, response.text


def stored_ids(running: Running, account: str) -> set[str]:
    return {d["event_id"] for d in running.backends.events.find({"account_id": account},
                                                                {"event_id": 1})}  # fmt: skip


async def settled(running: Running, account: str, expected: Iterable[str]) -> None:
    """Nothing queued, and exactly ``expected`` (event ids) stored for the account."""
    want = set(expected)

    def check() -> bool:
        return running.backends.queue_depth() == 0 and stored_ids(running, account) == want

    await eventually(check, 60, what=f"{account}: exactly the expected events stored")


async def check_windows(running: Running, account: str) -> None:
    """Every window of /summary and /timeseries equals the raw events."""
    for window in WINDOWS:
        response = await running.client.get(f"/summary/{account}",
                                            params={"window": window, "top": 100})  # fmt: skip
        assert response.status_code == 200, response.text
        got = response.json()
        truth = ground_truth(running.backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 100)  # fmt: skip
        assert figures(got) == truth, (window, got["from"], got["to"])
    raw = raw_events(running, account)
    for window, step in CASES:
        response = await running.client.get(f"/timeseries/{account}",
                                            params={"window": window, "step": step})  # fmt: skip
        assert response.status_code == 200, response.text
        check_points(response.json(), raw, step)


async def erase(running: Running, path: str, **params: Any) -> Doc:
    response = await running.client.delete(path, params=params or None)
    assert response.status_code == 200, response.text
    job: Doc = response.json()["erasure"]
    assert job["state"] == "done"
    return job


def user_path(account: str, user: str) -> str:
    return f"/accounts/{account}/users/{quote(user, safe='')}"


async def roll(running: Running, account: str) -> None:
    """Roll as a rollups process does: under the lease of the account's partition (an
    erasure's heads carry its lease's fencing token, which an unleased roller's can't
    follow)."""
    minute = floor(ms(datetime.now(UTC)), "minute")
    roller = Roller(running.db, running.redis, running.settings)
    leases = Leases(running.redis, running.settings, "test", 30.0)
    assert await leases.take([keys.rollup_partition_of(running.settings, account)], 60.0)
    roller.fence = leases.held
    try:
        await roller.roll(account, minute)
    finally:
        await leases.release()


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


async def test_erasing_a_user_takes_them_out_of_every_window(running: Running) -> None:
    now = datetime.now(UTC)
    account = unique("eu")
    users = ["u1", "u.2", "ü 3"]
    events = [event(account, i, users[i % 3], now - timedelta(minutes=i * 37 % (6 * 24 * 60)),
                    TYPES[i % 4]) for i in range(300)]  # fmt: skip
    # some of each user still only in the live tail, some a little in the future
    events += [event(account, 1000 + i, users[i % 3], now + timedelta(seconds=30 * i))
               for i in range(6)]  # fmt: skip
    await post_all(running, events[:250])
    await settled(running, account, (e["event_id"] for e in events[:250]))
    await roll(running, account)
    await post_all(running, events[250:])
    kept = {e["event_id"] for e in events if e["user_id"] != "u1"}
    await settled(running, account, (e["event_id"] for e in events))
    job = await erase(running, user_path(account, "u1"))
    assert job["events"] == len(events) - len(kept)
    assert job["user_hash"] and "u1" not in json.dumps(job)
    await settled(running, account, kept)
    await check_windows(running, account)
    # the same erasure again: nothing left to erase, nothing changes
    again = await erase(running, user_path(account, "u1"))
    assert (again["run"], again["events"], again["rollup_events"]) == (2, 0, 0)
    await check_windows(running, account)


@st.composite
def workloads(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Posts (fresh events, re-sent ones, late ones), rollovers and erasures of a user, a
    range or the whole account, interleaved; timestamps on minute/hour/window edges too."""
    now = datetime.now(UTC)
    edges = [e for e in edge_times(now) if e > now - timedelta(days=6, hours=12)]
    offsets = st.one_of(
        st.sampled_from(edges).flatmap(lambda e: st.sampled_from(
            [e, e - timedelta(milliseconds=1), e + timedelta(milliseconds=1)])),
        st.integers(0, 6 * 24 * 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(0, 3600).map(lambda s: now - timedelta(seconds=s)),
        st.integers(1, 240).map(lambda s: now + timedelta(seconds=s)),
    )  # fmt: skip
    steps: list[tuple[Any, ...]] = []
    n = 0
    for _ in range(draw(st.integers(3, 7))):
        kind = draw(st.sampled_from(["post", "post", "roll", "erase_user", "erase_user",
                                     "erase_range", "erase_account"]))  # fmt: skip
        if kind == "post":
            batch = []
            for _ in range(draw(st.integers(1, 40))):
                batch.append((n, draw(st.sampled_from(USERS)), draw(offsets),
                              draw(st.sampled_from(TYPES))))  # fmt: skip
                n += 1
            steps.append(("post", batch))
        elif kind == "erase_user":
            steps.append(("erase_user", draw(st.sampled_from(USERS))))
        elif kind == "erase_range":
            first, second = draw(offsets), draw(offsets)
            if first != second:
                steps.append(("erase_range", min(first, second), max(first, second)))
        else:
            steps.append((kind,))
    if not any(step[0].startswith("erase") for step in steps):
        steps.append(("erase_user", draw(st.sampled_from(USERS))))
    return steps


USERS = ["u0", "u1", "u.2", "ü 3"]


def edge_times(now: datetime) -> list[datetime]:
    from tests.test_summary import edge_times as edges

    return edges(now)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), phases=NO_SHRINK)
@given(steps=workloads(), seed=st.integers(0, 2**16))
async def test_erasures_interleaved_with_ingest_and_rollovers_stay_exact(
    running: Running, steps: list[tuple[Any, ...]], seed: int
) -> None:
    """Two accounts share user ids; only the erased account's events go. After each
    erasure every window of both equals the raw events, and the raw events equal what
    was sent minus what was erased."""
    account, other = unique("hyp"), unique("hyp_other")
    rng = random.Random(seed)
    model: dict[str, dict[str, Doc]] = {account: {}, other: {}}
    sent: list[Doc] = []
    for step in steps:
        if step[0] == "post":
            batch = [event(account, n, user, ts, type_) for n, user, ts, type_ in step[1]]
            batch += [event(other, n, user, ts, type_) for n, user, ts, type_ in step[1][:5]]
            batch += rng.sample(sent, min(3, len(sent)))  # re-sent: stored once (unless erased)
            sent += batch
            await post_all(running, batch)
            for doc in batch:
                model[doc["account_id"]].setdefault(doc["event_id"], doc)
            for name in (account, other):
                await settled(running, name, model[name])
        elif step[0] == "roll":
            for name in (account, other):
                await roll(running, name)
        else:
            if step[0] == "erase_user":
                job = await erase(running, user_path(account, step[1]))
                gone = {i for i, d in model[account].items() if d["user_id"] == step[1]}
            elif step[0] == "erase_range":
                start, end = step[1], step[2]
                job = await erase(running, f"/accounts/{account}/events", **{
                    "from": iso(start), "to": iso(end)})  # fmt: skip
                gone = {i for i, d in model[account].items()
                        if start <= parse_iso(d["timestamp"]) < end}  # fmt: skip
            else:
                job = await erase(running, f"/accounts/{account}")
                gone = set(model[account])
            assert job["events"] == len(gone), (step, job)
            for event_id in gone:
                del model[account][event_id]
            sent = [d for d in sent if d["account_id"] != account or d["event_id"] not in gone]
            for name in (account, other):
                await settled(running, name, model[name])
                await check_windows(running, name)


async def exported(running: Running, account: str) -> list[Doc]:
    now = datetime.now(UTC)
    params = {"from": iso(now - timedelta(days=8)), "to": iso(now + timedelta(hours=1))}
    response = await running.client.get(f"/accounts/{account}/export", params=params)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1] == {"export": "complete", "events": len(lines) - 1}
    return lines[:-1]


async def test_queued_events_of_an_erased_user_are_never_stored_shown_or_exported(
    app: AppFactory,
) -> None:
    """No flusher while the user is erased: their queued events (and only theirs) are kept
    out once one starts; /stream never shows them, the export never has them, and once the
    queue has moved past the erasure its tombstone goes and the audit record says how many
    queued events it kept out."""
    from core.erasure import prune_tombstones, tombstones
    from tests.test_stream import following
    from tests.test_stream import stored_ids as streamed

    running = await app()
    account = unique("queued")
    now = datetime.now(UTC)
    events = [event(account, i, ["gone", "stays"][i % 2], now - timedelta(minutes=i * 7),
                    TYPES[i % 4]) for i in range(60)]  # fmt: skip
    await post_all(running, events)
    assert running.backends.queue_depth() == 60 and running.backends.count(account) == 0
    job = await erase(running, user_path(account, "gone"))
    assert job["events"] == 0  # nothing stored yet
    [tombstone] = [t for t in await tombstones(running.redis, running.settings)
                   if t.account == account]  # fmt: skip
    assert tombstone.before is not None  # done: only what was queued before it finished
    async with following(running, account) as watched:
        running.start_flusher()
        kept = {e["event_id"] for e in events if e["user_id"] == "stays"}
        await settled(running, account, kept)
        # sent after the erasure finished: a new event of that user, stored as usual
        late = event(account, 500, "gone", now)
        await post_all(running, [late])
        await settled(running, account, kept | {"e500"})
        await eventually(lambda: len(streamed(watched)) >= len(kept) + 1, what="all shown")
    assert sorted(streamed(watched)) == sorted(kept | {"e500"})
    assert {e["event_id"] for e in await exported(running, account)} == kept | {"e500"}
    await check_windows(running, account)
    assert await prune_tombstones(running.db, running.redis, running.settings) >= 1
    assert not [t for t in await tombstones(running.redis, running.settings)
                if t.account == account]  # fmt: skip
    record = running.backends.db[keys.ERASURE_AUDIT].find_one({"job": job["id"]})
    assert record is not None and record["done"] and record["queued_dropped"] == 30
    assert record["user_hash"] == job["user_hash"] and "gone" not in json.dumps(record, default=str)
    assert record["by"] == "open (AUTH=open, no key)" and record["kind"] == "user"


async def test_a_range_and_then_a_whole_account_leave_nothing_in_any_figure_export_or_stream(
    running: Running,
) -> None:
    from tests.test_stream import following
    from tests.test_stream import stored_ids as streamed

    now = datetime.now(UTC).replace(microsecond=0)
    account = unique("whole")
    events = [event(account, i, f"u{i % 5}", now - timedelta(minutes=i * 11), TYPES[i % 4])
              for i in range(400)]  # fmt: skip
    await post_all(running, events[:300])
    await settled(running, account, (e["event_id"] for e in events[:300]))
    await roll(running, account)
    await post_all(running, events[300:])
    await settled(running, account, (e["event_id"] for e in events))
    start, end = now - timedelta(hours=20, minutes=13), now - timedelta(hours=2, seconds=1)
    job = await erase(running, f"/accounts/{account}/events", **{"from": iso(start),
                                                                 "to": iso(end)})  # fmt: skip
    kept = {e["event_id"] for e in events if not start <= parse_iso(e["timestamp"]) < end}
    assert job["events"] == len(events) - len(kept) and job["kind"] == "range"
    await settled(running, account, kept)
    await check_windows(running, account)
    assert {e["event_id"] for e in await exported(running, account)} == kept
    async with following(running, account) as watched:
        job = await erase(running, f"/accounts/{account}")
        assert job["events"] == len(kept)
        assert running.backends.count(account) == 0
        db = running.backends.db
        for name in (keys.WINDOWS, keys.INDEXES, keys.MINUTES, keys.HOURS):
            assert db[name].count_documents({"account_id": account}) == 0, name
        [head] = db[keys.HEADS].find({"account_id": account})  # one empty head is left
        assert (head["windows"], head["index"], head["erased"]) == ({}, None, 2)
        assert running.backends.tail_entries(account) == 0
        assert await exported(running, account) == []
        await check_windows(running, account)
        got = (await running.client.get(f"/summary/{account}", params={"window": "30d"})).json()
        assert figures(got) == {"total": 0, "totals": {}, "unique_users": 0, "top_users": []}
        # the account goes on: new events are stored, counted and shown
        fresh = [event(account, 2000 + i, "new", now - timedelta(minutes=i)) for i in range(5)]
        await post_all(running, fresh)
        await settled(running, account, (e["event_id"] for e in fresh))
        await eventually(lambda: len(streamed(watched)) >= 5, what="the new events shown")
    assert sorted(streamed(watched)) == sorted(e["event_id"] for e in fresh)
    await roll(running, account)
    await check_windows(running, account)


async def test_cached_answers_and_running_counts_never_count_erased_events(
    app: AppFactory,
) -> None:
    """Two workers (two apps on one store) with answers cached for a minute and running
    counts of the tail: right after the erasure reports done, both answer without the
    user, in the same minute (the tail part of their counts included)."""
    first = await app(summary_cache_seconds=60)
    second = await app(summary_cache_seconds=60, mongo_db=first.settings.mongo_db,
                       stream_key=first.settings.stream_key)  # fmt: skip
    first.start_flusher()
    account = unique("cached")
    now = datetime.now(UTC)
    older = [
        event(account, i, ["x", "y"][i % 2], now - timedelta(minutes=2, seconds=20 * i))
        for i in range(20)
    ]
    await post_all(first, older)
    await settled(first, account, (e["event_id"] for e in older))
    await roll(first, account)
    recent = [event(account, 100 + i, ["x", "y"][i % 2], datetime.now(UTC)) for i in range(10)]
    await post_all(first, recent)  # only in the live tail
    await settled(first, account, (e["event_id"] for e in older + recent))
    for worker in (first, second):
        for window in ("15m", "24h"):
            for _ in range(2):  # counted, then cached
                got = await worker.client.get(f"/summary/{account}", params={"window": window})
                assert got.json()["total"] == 30
    job = await erase(first, user_path(account, "x"))
    assert job["tail_events"] == 5 and job["rollup_events"] == 10
    for worker in (first, second):
        for window in ("15m", "24h"):
            got = (await worker.client.get(f"/summary/{account}", params={"window": window})).json()
            assert got["total"] == 15 and [u["user_id"] for u in got["top_users"]] == ["y"]
            series = (await worker.client.get(f"/timeseries/{account}",
                                              params={"window": window})).json()  # fmt: skip
            assert series["total"] == 15
    await check_windows(second, account)


def check_service_windows(url: str, backends: Any, account: str) -> None:
    """Every window of /summary and /timeseries of a running service equals the raw events."""
    for window in WINDOWS:
        got = httpx.get(f"{url}/summary/{account}", params={"window": window, "top": 100}).json()
        truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                             parse_iso(got["to"]), 100)  # fmt: skip
        assert figures(got) == truth, window
    raw = [(ms(d["timestamp"]), d["type"]) for d in
           backends.events.find({"account_id": account}, {"timestamp": 1, "type": 1})]  # fmt: skip
    for window, step in CASES:
        body = httpx.get(f"{url}/timeseries/{account}", params={"window": window, "step": step})
        check_points(body.json(), raw, step)


def cli_env(backends: Any, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": backends.redis_url, "MONGO_URL": backends.mongo_url,
            "MONGO_DB": backends.db_name, "STREAM_KEY": backends.stream,
            "PATH": "/usr/bin:/bin", **extra}  # fmt: skip


@pytest.mark.parametrize("kill_at", ["counting", "deleting"])
def test_an_eraser_killed_midway_finishes_exactly_when_run_again(
    start_service: ServiceFactory, kill_at: str
) -> None:
    """The CLI is SIGKILLed at the start of a step (before its corrections are in the
    rollups, or after, while raw events are being deleted), beside a running service
    whose rollups process takes the lease back meanwhile; the same command again resumes
    the job (same run), and every window is exact with none of the user's events left."""
    svc, backends = start_service(rollup_interval_seconds=0.5)
    account = unique("kill")
    now = datetime.now(UTC)
    users = ["victim", "a", "b", "c"]
    events = [event(account, i, users[i % 4], now - timedelta(minutes=2 + i * 7 % (6 * 1440)),
                    TYPES[i % 3]) for i in range(3000)]  # fmt: skip
    for i in range(0, len(events), 500):
        assert svc.post(events[i : i + 500]).status_code == 202
    wait_for(drained(backends, account, len(events)), 60, what="stored")
    command = [sys.executable, "-m", "scripts.erase", "user", "--account", account, "--user",
               "victim"]  # fmt: skip
    # the killed one's lease must lapse (within 5 s) before the second takes it
    env = cli_env(backends, ERASURE_LEASE_SECONDS="60", MAINTENANCE_LEASE_SECONDS="5")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert first.stderr is not None
        for line in first.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: any(f": {kill_at}" in line for line in lines), 60, 0.005,
             what=f"the eraser to reach {kill_at}")  # fmt: skip
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    reader.join(5)
    job = backends.db[keys.ERASURES].find_one({"account": account})
    assert job is not None and job["state"] == "running", job  # killed midway, not done
    assert job["corrected"] == (kill_at == "deleting")
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "erasure done" in again.stdout and "victim" not in again.stdout + again.stderr
    victims = {e["event_id"] for e in events if e["user_id"] == "victim"}
    assert backends.count(account) == len(events) - len(victims)
    assert not backends.events.count_documents({"account_id": account, "user_id": "victim"})
    done = backends.db[keys.ERASURES].find_one({"account": account})
    assert done is not None and (done["state"], done["run"]) == ("done", 1)
    assert done["events"] == len(victims) and done["rollup_events"] == len(victims)
    [record] = backends.db[keys.ERASURE_AUDIT].find({"account": account})
    assert record["done"] and record["events"] == len(victims)
    assert record["by"] == f"cli:uid={os.getuid()}"
    check_service_windows(svc.url, backends, account)


def test_an_erasure_beside_ingest_and_a_running_rollups_process(
    start_service: ServiceFactory,
) -> None:
    """Ingest goes on for every user during the erasure, and the rollups process hands
    its lease over and takes it back. The user's events accepted before the erasure
    finished (its ``finished_at``: events queued from then on are kept) are never
    stored; one sent after is; every window is exact."""
    svc, backends = start_service(rollup_interval_seconds=0.5)
    account = unique("live")
    now = datetime.now(UTC)
    users = ["victim", "a", "b"]
    old = [event(account, i, users[i % 3], now - timedelta(minutes=1 + i * 13 % 3000))
           for i in range(600)]  # fmt: skip
    assert svc.post(old).status_code == 202
    wait_for(drained(backends, account, len(old)), 60, what="stored")
    progress = keys.rollup_progress(backends.settings, 0)
    wait_for(lambda: backends.redis.get(progress), 90, 0.2, what="a rollover pass")
    stop = threading.Event()
    accepted: list[tuple[Doc, float]] = []  # each event, and when its 202 came (epoch s)

    def ingest() -> None:
        n = 10_000
        while not stop.is_set():
            batch = [event(account, n + i, users[i % 3], datetime.now(UTC) - timedelta(
                seconds=i * 40)) for i in range(9)]  # fmt: skip
            n += 9
            if svc.post(batch).status_code == 202:
                answered = time.time()
                accepted.extend((e, answered) for e in batch)
            time.sleep(0.02)

    thread = threading.Thread(target=ingest, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(accepted) > 100, 30, what="ingest under way")
        started = time.monotonic()
        response = httpx.delete(f"{svc.url}/accounts/{account}/users/victim", timeout=120)
        finished = time.monotonic()
        assert response.status_code == 200, response.text
        assert finished - started < 30  # the rollups process handed the lease over
        # the moment its tombstone stopped matching new entries: anything queued later is kept
        cutoff = parse_iso(response.json()["erasure"]["finished_at"]).timestamp()
        wait_for(lambda: len([a for a in accepted if a[1] > cutoff]) > 30, 30,
                 what="ingest after the erasure")  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    after = event(account, 99_999, "victim", datetime.now(UTC))
    assert svc.post([after]).status_code == 202
    sent = old + [e for e, _ in accepted] + [after]
    wait_for(lambda: backends.queue_depth() == 0, 60, what="the queue drained")
    stored = {d["event_id"] for d in backends.events.find({"account_id": account})}
    before = {e["event_id"] for e, at in accepted if at < cutoff and e["user_id"] == "victim"}
    assert before and not before & stored, sorted(before & stored)[:20]  # never stored
    others = {e["event_id"] for e in sent if e["user_id"] != "victim"}
    assert others <= stored and after["event_id"] in stored
    # the rollups process rolls again once the erasure let go of the lease
    target = floor(ms(datetime.now(UTC)), "minute") + 60_000
    wait_for(lambda: int(backends.redis.get(progress) or 0) >= target, 90, 0.2,
             what="a rollover pass after the erasure")  # fmt: skip
    check_service_windows(svc.url, backends, account)


def counted(events: Iterable[Doc], start: datetime, end: datetime) -> tuple[int, dict[str, int]]:
    types: dict[str, int] = {}
    for doc in events:
        if start <= parse_iso(doc["timestamp"]) < end:
            types[doc["type"]] = types.get(doc["type"], 0) + 1
    return sum(types.values()), dict(sorted(types.items()))


async def test_hours_older_than_the_raw_retention_come_out_of_the_buckets(
    running: Running,
) -> None:
    """Raw events of hours older than the raw retention are gone (retention deleted
    them; here: a retention of 4 days, and the raw events older than that deleted).
    Erasing a user there takes them out of every total and per-user figure, exactly; the
    per-type counts of those hours keep their events (no type breakdown per user is kept
    anywhere), as documented. Erasing a range of whole hours there is exact throughout."""
    from dataclasses import replace

    from core.erasure import Scope
    from rollups.erasure import Eraser

    now = datetime.now(UTC)
    account = unique("old")
    users = ["gone", "stays", "also"]
    # from 5 days ago to ~1.9 days ago, every 11 minutes
    events = [event(account, i, users[i % 3], now - timedelta(days=5, minutes=-i * 11),
                    TYPES[i % 4]) for i in range(400)]  # fmt: skip
    await post_all(running, events)
    await settled(running, account, (e["event_id"] for e in events))
    await roll(running, account)
    cutoff = now - timedelta(days=4)
    running.backends.events.delete_many({"account_id": account,
                                         "timestamp": {"$lt": cutoff}})  # fmt: skip
    settings4 = replace(running.settings, raw_retention_days=4)
    eraser = Eraser(running.db, running.redis, settings4, "test")
    job = await eraser.erase(Scope.of_user(account, "gone"))
    gone = [e for e in events if e["user_id"] == "gone"]
    stays = [e for e in events if e["user_id"] != "gone"]
    remaining = [e for e in gone if parse_iso(e["timestamp"]) < cutoff]  # types kept of these
    assert job.rollup_events == len(gone) and remaining
    for window in ("7d", "30d"):
        got = (await running.client.get(f"/summary/{account}",
                                        params={"window": window, "top": 100})).json()  # fmt: skip
        start, end = parse_iso(got["from"]), parse_iso(got["to"])
        total, _ = counted(stays, start, end)
        _, types = counted(stays + remaining, start, end)
        assert got["total"] == total and got["totals"] == types, window
        kept = {e["user_id"] for e in stays if start <= parse_iso(e["timestamp"]) < end}
        assert got["unique_users"] == len(kept)
        assert {u["user_id"] for u in got["top_users"]} == kept
    series = (await running.client.get(f"/timeseries/{account}",
                                       params={"window": "30d", "step": "1h"})).json()  # fmt: skip
    for point in series["points"]:  # whole hours: every point's total is exact
        start = parse_iso(point["start"])
        assert point["total"] == counted(stays, start, start + timedelta(hours=1))[0], start
    for window in ("15m", "1h", "6h", "24h"):  # no old hour in them: exact in every way
        got = (await running.client.get(f"/summary/{account}", params={"window": window})).json()
        start, end = parse_iso(got["from"]), parse_iso(got["to"])
        assert (got["total"], got["totals"]) == counted(stays, start, end)
    # a range of whole old hours: the buckets say exactly what they held
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=5, hours=-3)
    last = first + timedelta(hours=12)
    await eraser.erase(Scope.of_range(account, first, last))
    left = [e for e in stays + remaining if not first <= parse_iso(e["timestamp"]) < last]
    got = (await running.client.get(f"/summary/{account}",
                                    params={"window": "30d", "top": 100})).json()  # fmt: skip
    start, end = parse_iso(got["from"]), parse_iso(got["to"])
    assert got["totals"] == counted(left, start, end)[1]
    assert got["total"] == counted([e for e in left if e["user_id"] != "gone"], start, end)[0]
    # before the raw horizon a range must start and end on whole hours
    edge = (now - timedelta(days=7, minutes=-90)).replace(second=17)
    params = {"from": iso(edge), "to": iso(now - timedelta(days=6))}
    response = await running.client.delete(f"/accounts/{account}/events", params=params)
    assert response.status_code == 400 and "whole hour" in response.json()["message"]


async def test_an_entry_a_dead_flusher_partly_stored_before_the_erasure_is_erased_too(
    app: AppFactory,
) -> None:
    """A flusher read an entry, stored part of it and died before acknowledging it. The
    erasure waits for that entry (it may have been checked before the tombstone); the
    flusher that reclaims it deletes what the dead one stored of the user and counts the
    rest. And a dead letter holding the user's events loses them: a replay stores the
    others only."""
    from core.dead_letters import get, replay
    from core.events import Event, encode_events, to_document
    from service.queue import Consumer

    running = await app()
    account = unique("pending")
    part = keys.partition_of(running.settings, account)
    consumer = Consumer(running.redis, part, "dead-flusher", running.settings)
    await consumer.ensure_group()
    now = datetime.now(UTC)
    users = ["gone", "stays"]
    batch = [Event(event_id=f"p{i}", account_id=account, user_id=users[i % 2], type="login",
                   timestamp=now - timedelta(minutes=i)) for i in range(10)]  # fmt: skip
    await running.redis.xadd(part.stream, {"count": 10, "body": encode_events(batch)})
    await running.redis.incrby(part.depth, 10)
    [entry] = await consumer.read_new(1, None)  # read by the flusher that then dies
    partial = [to_document(e, entry.batch_id, now) for e in batch[:6]]  # 3 of them "gone"
    await running.db[keys.EVENTS].insert_many(partial)
    dead = [Event(event_id=f"d{i}", account_id=account, user_id=users[i % 2], type="page_view",
                  timestamp=now - timedelta(minutes=i)) for i in range(4)]  # fmt: skip
    dead_id = await running.redis.xadd(part.dead, {
        "count": 4, "body": encode_events(dead), "reason": "test", "source_id": "1-0",
        "attempts": 5, "first_failure": 1, "last_failure": 2, "stored": 0,
        "accounts": account})  # fmt: skip
    response = await running.client.delete(user_path(account, "gone"), params={"wait": 0})
    assert response.status_code == 202, response.text
    assert (
        response.headers["location"]
        == f"/accounts/{account}/erasures/{response.json()['erasure']['id']}"
    )
    running.start_flusher()  # reclaims the dead one's entry after CLAIM_IDLE_MS

    async def done() -> Doc | None:
        got = (await running.client.get(response.headers["location"])).json()["erasure"]
        return got if got["state"] == "done" else None

    job = await eventually(done, 60, 0.1, what="the erasure to finish")
    assert job["dead_letter_events"] == 2 and job["queued_dropped"] == 5
    await settled(running, account, {e.event_id for e in batch if e.user_id == "stays"})
    await check_windows(running, account)
    [letter] = [await get(running.redis, running.settings, f"{part.index}:{i[0].decode()}")
                for i in await running.redis.xrange(part.dead)]  # fmt: skip
    assert letter.id != f"{part.index}:{dead_id.decode()}" and letter.count == 2
    await replay(running.db, running.redis, running.settings, letter, "test")
    stays = {e.event_id for e in batch + dead if e.user_id == "stays"}
    await settled(running, account, stays)
    await check_windows(running, account)


DAY_1, DAY_2 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


@pytest.mark.parametrize(
    ("method", "path", "params", "status"),
    [("DELETE", "/accounts/bad%20account/users/u1", {}, 400),
     ("DELETE", "/accounts/acc_e/users/a%00b", {}, 400),
     ("DELETE", "/accounts/acc_e/users/%FF%FE", {}, 400),
     ("DELETE", "/accounts/acc_e/users/" + "a" * 129, {}, 400),
     ("DELETE", "/accounts/acc_e/users/u1", {"wait": "abc"}, 400),
     ("DELETE", "/accounts/acc_e/users/u1", {"wait": "301"}, 400),
     ("DELETE", "/accounts/acc_e/users/u1", {"wait": "-1"}, 400),
     ("DELETE", "/accounts/acc_e/users/u1", {"wait": "9" * 5000}, 400),
     ("DELETE", "/accounts/acc_e/events", {}, 400),
     ("DELETE", "/accounts/acc_e/events", {"from": "2026-01-01T00:00:00Z"}, 400),
     ("DELETE", "/accounts/acc_e/events", {"from": "yesterday", "to": DAY_2}, 400),
     ("DELETE", "/accounts/acc_e/events", {"from": DAY_1[:-1], "to": DAY_2[:-1]}, 400),
     ("DELETE", "/accounts/acc_e/events", {"from": DAY_2, "to": DAY_1}, 400),
     ("DELETE", "/accounts/acc_e/events", {"from": DAY_1, "to": DAY_1}, 400),
     ("DELETE", "/accounts/" + "a" * 65, {}, 400),
     ("GET", "/accounts/acc_e/erasures/u-nothing", {}, 404),
     ("GET", "/accounts/bad%20account/erasures", {}, 400)],
)  # fmt: skip
async def test_bad_erasure_requests_are_a_clear_4xx(
    running: Running, method: str, path: str, params: dict[str, str], status: int
) -> None:
    response = await running.client.request(method, path, params=params)
    assert response.status_code == status, response.text
    assert response.json()["error"] and response.json()["message"]


async def test_only_an_admin_key_of_the_account_may_erase(app: AppFactory) -> None:
    running = await app(api_keys="adm=acc_k@admin,other=acc_o@admin,rd=acc_k@read,wr=acc_k@write")
    path = "/accounts/acc_k/users/u1"
    assert (await running.client.delete(path)).status_code == 401
    for key, status in (("rd", 403), ("wr", 403), ("other", 403), ("nope", 401)):
        response = await running.client.delete(path, headers={"x-api-key": key})
        assert response.status_code == status, (key, response.text)
    response = await running.client.delete(path, headers={"x-api-key": "adm"})
    assert response.status_code == 200, response.text
    job = response.json()["erasure"]
    assert job["by"].startswith("key:") and job["state"] == "done"
    # an account nobody sent anything to gets no head (no state) from an erasure
    assert running.backends.db[keys.HEADS].count_documents({"account_id": "acc_k"}) == 0
    listing = await running.client.get("/accounts/acc_k/erasures", headers={"x-api-key": "adm"})
    assert [j["id"] for j in listing.json()["erasures"]] == [job["id"]]
    shown = await running.client.get(f"/accounts/acc_k/erasures/{job['id']}",
                                     headers={"x-api-key": "other"})  # fmt: skip
    assert shown.status_code == 403


def test_a_backfill_gets_the_lease_from_a_running_rollups_process(
    start_service: ServiceFactory,
) -> None:
    """The rollups process extends its lease every tick; asked for it, it hands it over."""
    from core import store
    from core.connections import connect_redis
    from rollups.backfill import Backfill

    _, backends = start_service(rollup_interval_seconds=0.5)
    lease = keys.rollup_lease(backends.settings, 0)
    wanted = keys.rollup_wanted(backends.settings, 0)
    wait_for(lambda: (holder(backends.redis.get(lease)) or "").startswith("rollups:"), 30,
             what="the rollups process to hold its lease")  # fmt: skip
    taken: list[str | None] = []

    async def backfill() -> None:
        settings = backends.settings
        client = store.connect(settings)
        redis = connect_redis(settings.redis_url)
        try:
            now = datetime.now(UTC)
            job = Backfill(store.database(client, settings), redis, settings)

            def seen(_: object) -> None:
                taken.append(holder(backends.redis.get(lease)))

            report = await job.run(now - timedelta(hours=2), now, progress=seen, lease_timeout=20)
            assert report.hours_done == report.hours_total
        finally:
            await client.close()
            await redis.aclose()

    asyncio.run(backfill())
    assert taken and all((h or "").startswith("backfill:") for h in taken)
    # and the rollups process takes it back once the backfill let go
    wait_for(lambda: (holder(backends.redis.get(lease)) or "").startswith("rollups:"), 30,
             what="the rollups process to take its lease back")  # fmt: skip
    assert not backends.redis.exists(wanted)


async def test_a_request_joining_a_computation_older_than_an_erasure_computes_afresh() -> None:
    """Identical requests share one computation (service/caches.py SingleFlight); one that
    joins a computation whose snapshot an erasure has since superseded (the head moved on:
    ``stale``) does not get its answer: it computes its own."""
    from service.caches import SingleFlight

    flights: SingleFlight = SingleFlight()
    gate = asyncio.Event()
    computed: list[str] = []

    async def before() -> tuple[str, str]:
        computed.append("before")
        await gate.wait()
        return "counts the erased events", "summary:acc:24h:5:0:-:v7"

    async def after() -> tuple[str, str]:
        computed.append("after")
        return "without them", "summary:acc:24h:5:0:-:v8"

    async def moved(shared: tuple[str, str]) -> bool:
        return shared[1].endswith(":v7")  # the head is at version 8 now

    leader = asyncio.ensure_future(flights.run("q", before))
    await asyncio.sleep(0)
    joiner = asyncio.ensure_future(flights.run("q", after))
    late = asyncio.ensure_future(flights.run("q", after, moved))
    await asyncio.sleep(0)
    gate.set()
    assert (await leader)[0] == (await joiner)[0] == "counts the erased events"
    assert (await late)[0] == "without them" and computed == ["before", "after"]


async def test_the_cli_erases_shows_progress_and_refuses_what_it_cannot_do(
    running: Running,
) -> None:
    account = unique("cli")
    now = datetime.now(UTC)
    events = [event(account, i, ["u1", "u2"][i % 2], now - timedelta(minutes=3 * i))
              for i in range(100)]  # fmt: skip
    await post_all(running, events)
    await settled(running, account, (e["event_id"] for e in events))
    env = {**cli_env(running.backends), "ERASURE_LEASE_SECONDS": "30"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scripts.erase", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    refused = await asyncio.to_thread(cli, "account", "--account", account)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    earlier = iso(now - timedelta(hours=1))
    backwards = await asyncio.to_thread(cli, "range", "--account", account, "--from", iso(now),
                                        "--to", earlier)  # fmt: skip
    assert backwards.returncode == 2 and "later than from" in backwards.stderr
    bad = await asyncio.to_thread(cli, "user", "--account", "bad account", "--user", "u1")
    assert bad.returncode == 2
    done = await asyncio.to_thread(cli, "user", "--account", account, "--user", "u1")
    assert done.returncode == 0, done.stderr
    assert "erasure done" in done.stdout and "50 stored events deleted" in done.stdout
    assert ": draining" in done.stderr and ": deleting hour" in done.stderr
    await settled(running, account, (e["event_id"] for e in events if e["user_id"] == "u2"))
    await check_windows(running, account)
    status = await asyncio.to_thread(cli, "status", "--account", account, "--json")
    [job] = [json.loads(line) for line in status.stdout.splitlines()]
    assert (job["state"], job["kind"], job["events"]) == ("done", "user", 50)
    audit = await asyncio.to_thread(cli, "audit", "--account", account)
    assert "done True" in audit.stdout and "events 50" in audit.stdout
    assert "u1" not in status.stdout + audit.stdout + done.stdout
