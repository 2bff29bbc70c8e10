"""GET /accounts/{account}/export and ``python -m scripts.export``, against the real servers.

The round trip is the contract: an export posted to a fresh service (its own
database and streams) gives the same summary for every window, and both equal
the figures counted from the raw events. Then: pages and cursors (a stream cut
midway resumes with nothing missing or repeated), gzip both ways, memory that
does not grow with the export, every bad request a 400, the admin key.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.events import Event, to_document
from core.export import Cursor
from tests.conftest import AppFactory, Running
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import eventually, iso, make_event, unique

WINDOWS = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
FIELDS = {"event_id", "account_id", "user_id", "type", "timestamp", "metadata",
          "original_timestamp"}  # fmt: skip
ADMIN, READER, OTHER_ADMIN = "k-admin-export", "k-read-export", "k-admin-other"


def utc_ms(text: str) -> str:
    ts = parse_iso(text).astimezone(UTC)
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def far_from_window_edges(ts: datetime, now: datetime, margin: timedelta) -> bool:
    """Not within ``margin`` of where a window starts, so no event leaves a window mid-test."""
    return all(abs((now - ts) - w) > margin for w in WINDOWS.values())


def workload(account: str, now: datetime, n: int = 400) -> list[dict[str, Any]]:
    rng = random.Random(20)
    events: list[dict[str, Any]] = []
    while len(events) < n:
        ts = now - timedelta(seconds=rng.uniform(120, 6.5 * 86400))
        if not far_from_window_edges(ts, now, timedelta(minutes=4)):
            continue
        kind = rng.choice(["page_view", "login", "message_sent", "custom"])
        event = make_event(account, len(events), user=f"user_{rng.randrange(40)}", type_=kind)
        # sent in several zones, with microseconds: exported in UTC, milliseconds
        zone = timezone(timedelta(hours=rng.choice([-5, 0, 2])))
        event["timestamp"] = ts.astimezone(zone).isoformat()
        if rng.random() < 0.4:
            event["metadata"] = {
                "plan": rng.choice(["free", "pro"]),
                "n": rng.randrange(10**12),
                "ratio": rng.random(),
                "ok": rng.random() < 0.5,
                "none": None,
                "nested": {"list": [1, "two", {"three": 3}], "é": "ünï"},
            }
        events.append(event)
    return events


def lines_of(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The events of an export answer and its trailer line."""
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows and "export" in rows[-1], "an answer ends with its trailer"
    assert all("export" not in r and "event_id" in r for r in rows[:-1])
    return rows[:-1], rows[-1]


async def export(running: Running, account: str, start: datetime, end: datetime,
                 key: str | None = None, **params: Any) -> httpx.Response:  # fmt: skip
    headers = {"Accept-Encoding": "identity"} | ({"X-API-Key": key} if key else {})
    query = {"from": iso(start), "to": iso(end), **params}
    return await running.client.get(f"/accounts/{account}/export", params=query, headers=headers)


async def post_all(running: Running, events: list[dict[str, Any]], key: str | None = None) -> None:
    headers = {"X-API-Key": key} if key else {}
    for start in range(0, len(events), 1000):
        answer = await running.post(events[start : start + 1000], headers=headers)
        assert answer.status_code == 202, answer.text


async def stored(running: Running, account: str, expected: int) -> None:
    def done() -> bool:
        return running.backends.queue_depth() == 0 and running.backends.count(account) == expected

    await eventually(done, 60, what=f"{expected} events of {account} stored")


async def test_an_export_posted_to_a_fresh_service_gives_the_same_summaries(
    app: AppFactory,
) -> None:
    source, target = await app(), await app()
    account, neighbour = unique("exp"), unique("nb")
    now = datetime.now(UTC)
    events = workload(account, now)
    await post_all(source, events)
    await post_all(source, events[:50])  # re-sent: stored and exported once
    await post_all(source, [make_event(neighbour, n) for n in range(20)])  # not exported
    # a device 5 h behind: shifted, keeping its own time as original_timestamp
    sent_at = now - timedelta(hours=5)
    skewed = [
        make_event(account, 1000 + n, user="user_skew", ts=sent_at - timedelta(minutes=100 + n))
        for n in range(10)
    ]
    answer = await source.post({"sent_at": iso(sent_at), "events": skewed})
    assert answer.status_code == 202
    source.start_flusher()
    total = len(events) + len(skewed)
    await stored(source, account, total)

    start, end = now - timedelta(days=7, hours=1), now + timedelta(minutes=10)
    answer = await export(source, account, start, end)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-ndjson"
    exported, end_line = lines_of(answer.text)
    assert end_line == {"export": "complete", "events": total}
    assert all(set(e) <= FIELDS and e["account_id"] == account for e in exported)
    assert len({e["event_id"] for e in exported}) == total
    by_id = {e["event_id"]: e for e in exported}
    for sent in events:  # exactly what was posted, times in UTC
        want = {**sent, "timestamp": utc_ms(sent["timestamp"])}
        assert by_id[sent["event_id"]] == want
    for sent in skewed:
        got = by_id[sent["event_id"]]
        assert got["original_timestamp"] == utc_ms(sent["timestamp"])
        shift = parse_iso(got["timestamp"]) - parse_iso(sent["timestamp"])
        assert abs(shift - timedelta(hours=5)) < timedelta(seconds=30)
    order = [(Cursor.after(e).hour, e["event_id"]) for e in exported]
    assert order == sorted(order), "(hour, event_id) order: what cursors rely on"

    await post_all(target, exported)  # the file as it is, in batches of 1,000
    target.start_flusher()
    await stored(target, account, total)
    for window in WINDOWS:
        params: dict[str, Any] = {"window": window, "top": 100}
        theirs = (await source.client.get(f"/summary/{account}", params=params)).json()
        ours = (await target.client.get(f"/summary/{account}", params=params)).json()
        assert figures(ours) == figures(theirs), window
        truth = ground_truth(target.backends.events, account, parse_iso(ours["from"]),
                             parse_iso(ours["to"]), 100)  # fmt: skip
        assert figures(ours) == truth, window
    assert figures(ours)["total"] == total  # the 30d window holds every event
    again = await export(target, account, start, end)
    assert again.text == answer.text, "exporting the copy gives the same lines"
    assert target.backends.count(neighbour) == 0


def bulk_documents(account: str, now: datetime, n: int, hours: int) -> list[dict[str, Any]]:
    """Stored events spread over ``hours`` hours, written straight to the store (fast)."""
    docs = []
    for i in range(n):
        ts = now - timedelta(hours=hours) + timedelta(seconds=i * hours * 3600 / n)
        event = Event(event_id=f"b{i:06d}", account_id=account, user_id=f"u{i % 97}",
                      type="page_view", timestamp=ts,
                      metadata={"i": i, "pad": "x" * 100})  # fmt: skip
        docs.append(to_document(event, "bulk", now))
    return docs


@pytest.fixture
async def bulk(app: AppFactory) -> tuple[Running, str, datetime, datetime, list[str]]:
    running = await app(export_batch_size=200)
    account = unique("bulk")
    now = datetime.now(UTC).replace(microsecond=0)
    docs = bulk_documents(account, now, 20_000, 30)
    for start in range(0, len(docs), 5000):
        running.backends.events.insert_many(docs[start : start + 5000])
    ids = sorted((d["hour"], d["event_id"]) for d in docs)
    return running, account, now - timedelta(hours=31), now, [i for _, i in ids]


async def test_pages_and_a_cut_stream_resume_with_nothing_missing_or_repeated(
    bulk: tuple[Running, str, datetime, datetime, list[str]],
) -> None:
    running, account, start, end, ids = bulk
    whole = await export(running, account, start, end)
    every, end_line = lines_of(whole.text)
    assert [e["event_id"] for e in every] == ids and end_line["events"] == len(ids)

    # pages of 3,000: each ends with the cursor of its last event
    got: list[str] = []
    cursor: str | None = None
    answers = 0
    while True:
        params: dict[str, Any] = {"limit": 3000} | ({"cursor": cursor} if cursor else {})
        page, end_line = lines_of((await export(running, account, start, end, **params)).text)
        answers += 1
        got += [e["event_id"] for e in page]
        if end_line["export"] == "complete":
            break
        assert end_line["export"] == "partial" and end_line["events"] == 3000
        assert end_line["cursor"] == str(Cursor.after(page[-1]))
        cursor = end_line["cursor"]
    assert got == ids and answers == 7

    # a stream cut by the client midway: resumed from the last line it received
    query = {"from": iso(start), "to": iso(end)}
    received: list[dict[str, Any]] = []
    async with running.client.stream("GET", f"/accounts/{account}/export", params=query) as cut:
        async for text in cut.aiter_lines():
            received.append(json.loads(text))
            if len(received) == 7777:
                break  # the connection closes here, the answer unfinished
    resume = str(Cursor.after(received[-1]))
    rest, end_line = lines_of((await export(running, account, start, end, cursor=resume)).text)
    assert [e["event_id"] for e in received + rest] == ids
    assert end_line == {"export": "complete", "events": len(ids) - 7777}


async def test_gzip_as_a_file_and_as_a_content_encoding(
    bulk: tuple[Running, str, datetime, datetime, list[str]],
) -> None:
    running, account, start, end, _ = bulk
    plain = (await export(running, account, start, end)).content
    as_file = await export(running, account, start, end, gzip="1")
    assert as_file.headers["content-type"] == "application/gzip"
    assert "content-encoding" not in as_file.headers
    assert gzip.decompress(as_file.content) == plain
    assert len(as_file.content) < len(plain) / 4
    query = {"from": iso(start), "to": iso(end)}
    encoded = await running.client.get(f"/accounts/{account}/export", params=query,
                                       headers={"Accept-Encoding": "gzip"})  # fmt: skip
    assert encoded.headers["content-encoding"] == "gzip"
    assert encoded.content == plain  # httpx decodes it


async def test_memory_does_not_grow_with_the_export(
    bulk: tuple[Running, str, datetime, datetime, list[str]],
) -> None:
    """The worker holds one read batch (EXPORT_BATCH_SIZE=200 here) and one 64 KiB chunk,
    however long the export: the peak of Python allocations exporting 20,000 events
    (in this process: the app, its driver and the test's client) stays near that of 2,000."""
    running, account, _, end, _ = bulk

    async def peak(hours: int) -> tuple[int, int]:
        received = 0
        tracemalloc.start()
        try:
            query = {"from": iso(end - timedelta(hours=hours)), "to": iso(end)}
            async with running.client.stream("GET", f"/accounts/{account}/export",
                                             params=query) as answer:  # fmt: skip
                async for chunk in answer.aiter_bytes():
                    received += len(chunk)
            return tracemalloc.get_traced_memory()[1], received
        finally:
            tracemalloc.stop()

    small, small_bytes = await peak(3)
    large, large_bytes = await peak(31)
    assert large_bytes > 9 * small_bytes
    assert large < small * 1.5 + 512 * 1024, (small, large)
    assert large < large_bytes / 4, (large, large_bytes)


async def test_every_bad_request_is_a_400_and_only_an_admin_key_of_the_account_may_export(
    app: AppFactory,
) -> None:
    keys = f"{ADMIN}=acc_x@admin,{READER}=acc_x@read,{OTHER_ADMIN}=acc_y@admin"
    running = await app(api_keys=keys, export_max_events=100)
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=2), now
    url = "/accounts/acc_x/export"
    ok = {"from": iso(start), "to": iso(end)}
    bad = [
        {"to": iso(end)}, {"from": iso(start)}, ok | {"from": "yesterday"},
        ok | {"from": "2026-11-26T09:00:00"}, ok | {"to": iso(start)},
        ok | {"to": iso(start - timedelta(hours=1))},
        ok | {"cursor": "nonsense"}, ok | {"cursor": "2026-13-40T99:00:00Z~e1"},
        ok | {"cursor": f"{now - timedelta(days=3):%Y-%m-%dT%H}:00:00Z~e1"},
        ok | {"limit": "0"}, ok | {"limit": "101"}, ok | {"limit": "ten"},
        ok | {"limit": "9" * 5000}, ok | {"gzip": "yes"}, ok | {"from": "9" * 5000},
        ok | {"from": "0001-01-01T00:00:00+01:00"}, ok | {"to": "9999-12-31T23:59:59-01:00"},
    ]  # fmt: skip
    for params in bad:
        answer = await running.client.get(url, params=params, headers={"X-API-Key": ADMIN})
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["error"] == "bad_request" and answer.json()["message"]
    answer = await running.client.get("/accounts/bad%20account/export", params=ok,
                                      headers={"X-API-Key": ADMIN})  # fmt: skip
    assert answer.status_code == 400
    assert (await running.client.get(url, params=ok)).status_code == 401
    for key in (READER, OTHER_ADMIN):
        answer = await running.client.get(url, params=ok, headers={"X-API-Key": key})
        assert answer.status_code == 403, key
    answer = await running.client.get(url, params=ok, headers={"X-API-Key": ADMIN})
    assert answer.status_code == 200
    assert lines_of(answer.text) == ([], {"export": "complete", "events": 0})
    # the whole calendar reads only the hours where events can be stored
    everything = {"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"}
    started = time.monotonic()
    answer = await running.client.get(url, params=everything, headers={"X-API-Key": ADMIN})
    assert answer.status_code == 200 and time.monotonic() - started < 10
    assert lines_of(answer.text) == ([], {"export": "complete", "events": 0})


def cli(running: Running, *args: str) -> subprocess.CompletedProcess[bytes]:
    s = running.settings
    env = {**os.environ, "REDIS_URL": s.redis_url, "MONGO_URL": s.mongo_url,
           "MONGO_DB": s.mongo_db, "STREAM_KEY": s.stream_key,
           "EXPORT_BATCH_SIZE": "500"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "scripts.export", *args], env=env,
                          capture_output=True, timeout=120, check=False)  # fmt: skip


async def test_the_cli_writes_the_events_alone_and_resumes_from_a_cursor(
    bulk: tuple[Running, str, datetime, datetime, list[str]], tmp_path: Path
) -> None:
    running, account, start, end, ids = bulk
    plain = (await export(running, account, start, end)).content
    events_only = b"".join(plain.splitlines(keepends=True)[:-1])
    span = ["--account", account, "--from", iso(start), "--to", iso(end)]
    whole = tmp_path / "whole.ndjson"
    done = cli(running, *span, "--out", str(whole))
    assert done.returncode == 0, done.stderr
    assert whole.read_bytes() == events_only
    assert f"exported {len(ids)} events".encode() in done.stderr
    # the first 5,000 over HTTP, the rest appended by the CLI from the cursor
    first, end_line = lines_of((await export(running, account, start, end, limit=5000)).text)
    part = tmp_path / "part.ndjson.gz"
    with gzip.open(part, "wb") as out:
        out.writelines(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in first)
    resumed = cli(running, *span, "--gzip", "--out", str(part), "--resume", end_line["cursor"])
    assert resumed.returncode == 0, resumed.stderr
    lines = gzip.decompress(part.read_bytes()).splitlines()  # two gzip members, one file
    assert [json.loads(line)["event_id"] for line in lines] == ids
    refused = cli(running, *span, "--resume", "not-a-cursor")
    assert refused.returncode == 2 and b"not an export cursor" in refused.stderr
    refused = cli(running, "--account", account, "--from", iso(end), "--to", iso(start))
    assert refused.returncode == 2 and b"to must be later than from" in refused.stderr
