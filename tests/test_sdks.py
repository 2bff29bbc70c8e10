"""The SDK-compatible routes and client clock skew, against the real servers.

The Segment, RudderStack and PostHog SDKs from PyPI send through their own
queues and consumer threads to the in-process service (retries off, so a
refusal shows up as an ``on_error`` call instead of a delay); then every event
they sent must be stored exactly once and /summary must equal the ground truth
counted from the raw events. Raw-HTTP tests cover each refusal (nothing stored
anywhere) and gzip. The skew tests send batches from devices whose clocks are
off, through the POST /events envelope and the SDK envelopes.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from posthog import Posthog
from rudderstack.analytics import Client as RudderClient
from segment.analytics import Client as SegmentClient

from tests.conftest import AppFactory, Running
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import Backends, Service, drained, eventually, iso, make_event, unique
from tests.test_validation import assert_nothing_stored

Errors = list[tuple[Exception, Any]]


@pytest.fixture
async def running(app: AppFactory) -> Running:
    started = await app()
    started.start_flusher()
    return started


def host_of(running: Running) -> str:
    return str(running.client.base_url).rstrip("/")


def recorder(errors: Errors) -> Callable[[Exception, Any], None]:
    return lambda exc, batch: errors.append((exc, batch))


def basic(write_key: str) -> dict[str, str]:
    token = base64.b64encode(f"{write_key}:".encode()).decode()
    return {"authorization": f"Basic {token}"}


def now() -> datetime:
    return datetime.now(UTC)


def ms(ts: datetime) -> datetime:
    """What MongoDB keeps of a time: milliseconds."""
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


async def stored_exactly(running: Running, account: str, event_ids: list[str]) -> dict[str, Any]:
    """Wait until the queue is empty and exactly these events are stored; return them by id."""
    await eventually(drained(running.backends, account, len(set(event_ids))), what=account)
    docs = {d["event_id"]: d for d in running.backends.stored(account)}
    assert sorted(docs) == sorted(set(event_ids))
    return docs


async def summary_agrees(running: Running, account: str, total: int) -> dict[str, Any]:
    got = (await running.client.get(f"/summary/{account}", params={"top": 20})).json()
    truth = ground_truth(
        running.backends.events, account, parse_iso(got["from"]), parse_iso(got["to"]), 20
    )
    assert figures(got) == truth
    assert got["total"] == total
    return dict(got)


# --- the real SDKs -------------------------------------------------------------


def segment_calls(client: Any, account: str) -> list[str]:
    """Every message type through a Segment-style client; returns the message ids sent."""
    sent = []
    for i in range(12):
        _, msg = client.track(
            user_id=f"user_{i % 3}",
            event="Order Completed" if i % 2 else "Product Viewed",
            properties={"order": i, "total": 9.5, "items": [{"sku": "a"}]},
        )
        sent.append(msg["messageId"])
    _, msg = client.page(user_id="user_0", category="Docs", name="Home", properties={"path": "/"})
    sent.append(msg["messageId"])
    _, msg = client.screen(anonymous_id="anon-1", name="Settings")
    sent.append(msg["messageId"])
    _, msg = client.identify(user_id="user_1", traits={"plan": "pro"})
    sent.append(msg["messageId"])
    # the same message twice (an app re-sending it): stored once
    for _ in range(2):
        _, msg = client.track(user_id="user_2", event="Signed Up", message_id=f"{account}-dup")
    sent.append(msg["messageId"])
    return sent


def check_segment_documents(docs: dict[str, Any], sent: list[str]) -> None:
    kinds = [docs[m]["type"] for m in sent]
    assert kinds == ["product_viewed", "order_completed"] * 6 + [
        "page",
        "screen",
        "identify",
        "signed_up",
    ]
    first = docs[sent[1]]
    assert first["user_id"] == "user_1"
    assert first["metadata"] == {
        "event": "Order Completed",
        "properties": {"order": 1, "total": 9.5, "items": [{"sku": "a"}]},
    }
    page, screen, identify = (docs[m] for m in sent[12:15])
    assert page["metadata"] == {"name": "Home", "category": "Docs", "properties": {"path": "/"}}
    assert screen["user_id"] == "anon-1" and screen["metadata"] == {"name": "Settings"}
    assert identify["metadata"] == {"traits": {"plan": "pro"}}
    assert all("original_timestamp" not in d for d in docs.values())  # clocks agree: no shift


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_segment_sdk_events_are_stored_once_and_counted(
    running: Running, compress: bool
) -> None:
    account = unique("seg")
    errors: Errors = []
    client = SegmentClient(
        write_key=account, host=host_of(running), gzip=compress, max_retries=0,
        on_error=recorder(errors), upload_size=5, upload_interval=0.05,
    )  # fmt: skip
    sent = segment_calls(client, account)
    await asyncio.to_thread(client.shutdown)  # flush the SDK's queue, stop its thread
    assert errors == []
    docs = await stored_exactly(running, account, sent)
    check_segment_documents(docs, sent)
    got = await summary_agrees(running, account, 16)
    assert got["totals"]["order_completed"] == 6


async def test_rudderstack_sdk_events_are_stored_once_and_counted(running: Running) -> None:
    account = unique("rudder")
    errors: Errors = []
    # RudderStack's SDK gzips by default and takes only an exact 200 as success
    client = RudderClient(
        write_key=account, host=host_of(running), max_retries=0,
        on_error=recorder(errors), upload_size=5, upload_interval=0.05,
    )  # fmt: skip
    sent = segment_calls(client, account)
    await asyncio.to_thread(client.shutdown)
    assert errors == []
    docs = await stored_exactly(running, account, sent)
    check_segment_documents(docs, sent)
    await summary_agrees(running, account, 16)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_posthog_sdk_events_are_stored_once_and_counted(
    running: Running, compress: bool
) -> None:
    account = unique("phc")
    errors: Errors = []
    client = Posthog(
        account, host=host_of(running), gzip=compress, max_retries=0,
        on_error=recorder(errors), flush_at=5, flush_interval=0.05,
    )  # fmt: skip
    sent = []
    for i in range(12):
        event = "$pageview" if i % 3 == 0 else "Button Clicked"
        properties = {"$current_url": f"/p/{i}", "button": i}
        sent.append(client.capture(event, distinct_id=f"user_{i % 4}", properties=properties))
    sent.append(client.set(distinct_id="user_1", properties={"plan": "pro"}))
    again = str(uuid.uuid4())
    for _ in range(2):  # a re-sent event is stored once
        sent.append(client.capture("Signed Up", distinct_id="user_2", uuid=again))
    await asyncio.to_thread(client.shutdown)
    assert errors == []
    assert all(sent)
    event_ids = [str(u) for u in sent]
    docs = await stored_exactly(running, account, event_ids)
    assert len(docs) == 14
    kinds = [docs[u]["type"] for u in event_ids[:12]]
    assert kinds == ["pageview", "button_clicked", "button_clicked"] * 4
    view = docs[event_ids[0]]
    assert view["user_id"] == "user_0"
    assert view["metadata"]["event"] == "$pageview"
    assert view["metadata"]["properties"] == {"button": 0}
    # PostHog's own "$" properties, which MongoDB cannot store as keys, without the "$"
    assert view["metadata"]["posthog"]["current_url"] == "/p/0"
    assert view["metadata"]["posthog"]["lib"] == "posthog-python"
    person = docs[event_ids[12]]
    assert person["type"] == "set" and person["metadata"]["set"] == {"plan": "pro"}
    got = await summary_agrees(running, account, 14)
    assert got["totals"] == {"pageview": 4, "button_clicked": 8, "set": 1, "signed_up": 1}


async def test_sdk_refusal_reaches_the_sdk_as_an_error_it_does_not_retry(app: AppFactory) -> None:
    running = await app()  # no flusher: anything enqueued would stay visible in the stream
    errors: Errors = []
    client = SegmentClient(
        write_key="not a valid account!", host=host_of(running), max_retries=3,
        on_error=recorder(errors), upload_interval=0.05,
    )  # fmt: skip
    client.track(user_id="u1", event="Anything")
    await asyncio.to_thread(client.shutdown)
    assert len(errors) == 1
    exc: Any = errors[0][0]  # segment.analytics.request.APIError
    assert exc.status == 401 and exc.code == "unauthorized"
    assert "write key" in exc.message
    assert running.backends.stream_entries() == 0


# --- raw HTTP: answers and refusals --------------------------------------------


def segment_message(n: int, **extra: Any) -> dict[str, Any]:
    message = {
        "type": "track",
        "messageId": f"m{n}",
        "userId": "u1",
        "event": "Order Completed",
        "properties": {"n": n},
        "timestamp": iso(now() - timedelta(seconds=5)),
    }
    message.update(extra)
    return {k: v for k, v in message.items() if v is not None}


def posthog_event(n: int, **extra: Any) -> dict[str, Any]:
    event = {
        "event": "$pageview",
        "uuid": f"0000000{n}-0000-4000-8000-000000000000",
        "distinct_id": "u1",
        "properties": {"$lib": "curl", "n": n},
        "timestamp": iso(now() - timedelta(seconds=5)),
    }
    event.update(extra)
    return {k: v for k, v in event.items() if v is not None}


async def post_segment(
    running: Running, account: str | None, body: Any, **headers: str
) -> httpx.Response:
    auth = basic(account) if account is not None else {}
    return await running.client.post(
        "/v1/batch",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json", **auth, **headers},
    )


async def test_segment_batch_answers_200_with_count(running: Running) -> None:
    account = unique("acc")
    batch = {"batch": [segment_message(i) for i in range(3)], "sentAt": iso(now())}
    response = await post_segment(running, account, batch)
    assert response.status_code == 200
    assert response.json() == {"success": True, "count": 3}
    await stored_exactly(running, account, ["m0", "m1", "m2"])


async def test_write_key_in_the_body_and_messages_without_a_time(running: Running) -> None:
    account = unique("acc")
    sent_at = now()
    message = segment_message(1, timestamp=None, userId=None, anonymousId="anon 1")
    response = await post_segment(
        running, None, {"batch": [message], "writeKey": account, "sentAt": iso(sent_at)}
    )
    assert response.status_code == 200, response.text
    doc = (await stored_exactly(running, account, ["m1"]))["m1"]
    assert doc["user_id"] == "anon 1"
    assert doc["timestamp"] == ms(sent_at)  # no time of its own: when the batch was sent


@pytest.mark.parametrize("path", ["/batch/", "/batch", "/i/v0/ai/batch/"])
async def test_posthog_batch_answers_200_with_status_1(running: Running, path: str) -> None:
    account = unique("acc")
    body = {"api_key": account, "batch": [posthog_event(1), posthog_event(2)]}
    response = await running.client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": 1, "count": 2}
    await stored_exactly(running, account, [posthog_event(i)["uuid"] for i in (1, 2)])


@pytest.mark.parametrize("path", ["/capture/", "/e/", "/i/v0/e/"])
async def test_posthog_single_event_capture(running: Running, path: str) -> None:
    account = unique("acc")
    event = posthog_event(3, api_key=account)
    response = await running.client.post(path, json=event)
    assert response.status_code == 200, response.text
    doc = (await stored_exactly(running, account, [event["uuid"]]))[event["uuid"]]
    assert doc["type"] == "pageview"
    assert doc["metadata"] == {"event": "$pageview", "properties": {"n": 3},
                               "posthog": {"lib": "curl"}}  # fmt: skip


async def test_posthog_js_style_token_and_distinct_id_in_properties(running: Running) -> None:
    account = unique("acc")
    event = posthog_event(4, distinct_id=None, properties={"token": account, "distinct_id": "d1"})
    response = await running.client.post("/e/", content=json.dumps(event).encode(),
                                         headers={"content-type": "text/plain"})  # fmt: skip
    assert response.status_code == 200, response.text
    doc = (await stored_exactly(running, account, [event["uuid"]]))[event["uuid"]]
    assert doc["user_id"] == "d1"


async def test_gzip_bodies_are_accepted(running: Running) -> None:
    account = unique("acc")
    segment = gzip.compress(json.dumps({"batch": [segment_message(1)]}).encode())
    response = await running.client.post(
        "/v1/batch", content=segment,
        headers={"content-encoding": "gzip", "content-type": "application/json", **basic(account)},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    # two gzip members, as concatenated files are: one body
    body = json.dumps({"api_key": account, "batch": [posthog_event(2)]}).encode()
    posthog = gzip.compress(body[:20]) + gzip.compress(body[20:])
    response = await running.client.post("/batch/", content=posthog,
                                         headers={"content-encoding": "gzip"})  # fmt: skip
    assert response.status_code == 200, response.text
    await stored_exactly(running, account, ["m1", posthog_event(2)["uuid"]])


async def test_decompressed_size_is_bounded_by_max_body_bytes(app: AppFactory) -> None:
    running = await app(max_body_bytes=4096)
    running.start_flusher()
    account = unique("acc")
    body = json.dumps({"batch": [segment_message(1)]}).encode()
    exactly = body[:-1] + b" " * (4096 - len(body)) + b"}"
    assert len(exactly) == 4096
    headers = {"content-encoding": "gzip", **basic(account)}
    fits = await running.client.post("/v1/batch", content=gzip.compress(exactly), headers=headers)
    assert fits.status_code == 200, fits.text
    one_more = exactly[:-1] + b" }"
    over = await running.client.post("/v1/batch", content=gzip.compress(one_more), headers=headers)
    assert over.status_code == 413
    assert over.json()["error"] == "body_too_large"
    await stored_exactly(running, account, ["m1"])


@pytest.mark.parametrize("path", ["/v1/batch", "/batch/"])
async def test_gzip_bomb_is_refused_413_and_stores_nothing(app: AppFactory, path: str) -> None:
    running = await app()
    account = unique("bomb")
    # 64 MiB of JSON whitespace inside a valid batch, ~64 KiB compressed
    head = json.dumps({"api_key": account, "batch": [posthog_event(1)]}).encode()
    bomb = gzip.compress(head[:-1] + b" " * (64 << 20) + b"}", compresslevel=9)
    assert len(bomb) < 1 << 20  # passes the compressed-size limit
    response = await running.client.post(
        path, content=bomb, headers={"content-encoding": "gzip", **basic(account)}
    )
    assert response.status_code == 413
    body = response.json()
    assert body["error"] == "body_too_large" and "decompressed" in body["message"]
    assert_nothing_stored(running, account)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"this is not gzip", "not valid gzip"),
        (gzip.compress(b'{"batch": []}')[:-9], "ends inside"),
        (b"", "ends inside"),
        (gzip.compress(b'{"batch": []}') + b"garbage", "not valid gzip"),
    ],
    ids=["not gzip", "truncated", "empty", "trailing garbage"],
)
async def test_bad_gzip_is_a_400(app: AppFactory, content: bytes, fragment: str) -> None:
    running = await app()
    account = unique("acc")
    for path, key in (("/v1/batch", "code"), ("/batch/", "detail")):
        response = await running.client.post(
            path, content=content, headers={"content-encoding": "gzip", **basic(account)}
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "bad_request" and fragment in body["message"]
        assert key in body
    assert_nothing_stored(running, account)


async def test_unsupported_encoding_and_content_type_are_415(app: AppFactory) -> None:
    running = await app()
    account = unique("acc")
    body = json.dumps({"batch": [segment_message(1)]}).encode()
    brotli = await running.client.post(
        "/v1/batch", content=body, headers={"content-encoding": "br", **basic(account)}
    )
    assert brotli.status_code == 415 and "Content-Encoding" in brotli.json()["message"]
    form = await running.client.post(
        "/v1/batch", content=body,
        headers={"content-type": "application/x-www-form-urlencoded", **basic(account)},
    )  # fmt: skip
    assert form.status_code == 415
    assert_nothing_stored(running, account)


async def test_missing_and_invalid_write_keys_are_401(app: AppFactory) -> None:
    running = await app()
    batch = {"batch": [segment_message(1)]}
    missing = await post_segment(running, None, batch)
    assert missing.status_code == 401
    body = missing.json()
    assert body["error"] == "unauthorized" and body["code"] == "unauthorized"
    assert "Basic" in body["message"]
    for bad in ("has space", "x" * 65, "a|b", ""):
        response = await post_segment(running, bad, batch)
        assert response.status_code == 401, bad
        assert "write key" in response.json()["message"]
    garbled = await post_segment(running, None, batch, authorization="Basic %%%")
    assert garbled.status_code == 401
    no_key = await running.client.post("/batch/", json={"batch": [posthog_event(1)]})
    assert no_key.status_code == 401
    assert "api_key" in no_key.json()["detail"]
    assert running.backends.stream_entries() == 0 and running.backends.queue_depth() == 0


async def test_write_keys_with_api_keys_on(app: AppFactory) -> None:
    mine = unique("acc")
    running = await app(api_keys=f"wk_live_1={mine},k_two={mine}|other,k_all=*")
    running.start_flusher()
    batch = {"batch": [segment_message(1)]}
    unknown = await post_segment(running, "wk_nope", batch)
    assert unknown.status_code == 401 and "unknown API key" in unknown.json()["message"]
    for ambiguous in ("k_two", "k_all"):
        response = await post_segment(running, ambiguous, batch)
        assert response.status_code == 403, ambiguous
        assert response.json()["code"] == "forbidden"
    # the write key is an API key; its one account is where the events go
    ok = await post_segment(running, "wk_live_1", batch)
    assert ok.status_code == 200, ok.text
    await stored_exactly(running, mine, ["m1"])
    assert running.backends.count("wk_live_1") == 0


def segment_bad(n: int) -> dict[str, Any]:
    return segment_message(n, properties={"nested": {"text": "a\x00b"}})


BAD_MESSAGES: list[tuple[str, Any, str | None, str]] = [
    ("missing messageId", lambda n: segment_message(n, messageId=None), "messageId", "dedupe"),
    ("no user", lambda n: segment_message(n, userId=None), "userId", "anonymousId"),
    ("unknown type", lambda n: segment_message(n, type="bogus"), "type", "must be one of"),
    ("track without event", lambda n: segment_message(n, event=None), "event", "event name"),
    ("properties not an object", lambda n: segment_message(n, properties=[1]), "properties",
     "object"),
    ("properties break a metadata rule", segment_bad, "properties", "NUL"),
    ("properties too large", lambda n: segment_message(n, properties={"p": "x" * 9000}),
     "properties", "bytes"),
    ("messageId bad characters", lambda n: segment_message(n, messageId="m 1"), "messageId",
     "A-Z a-z 0-9"),
    ("userId control character", lambda n: segment_message(n, userId="u\x07"), "userId",
     "printable"),
    ("timestamp in the future", lambda n: segment_message(n, timestamp=iso(now() + timedelta(
        hours=1))), "timestamp", "future"),
    ("timestamp without zone", lambda n: segment_message(n, timestamp="2026-01-01T00:00:00"),
     "timestamp", "timezone"),
    ("not an object", lambda n: 5, None, "JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "field", "fragment"), [(b, f, m) for _, b, f, m in BAD_MESSAGES],
                         ids=[c for c, _, _, _ in BAD_MESSAGES])  # fmt: skip
async def test_invalid_segment_message_refuses_the_whole_batch(
    app: AppFactory, build: Any, field: str | None, fragment: str
) -> None:
    running = await app()  # no flusher: anything enqueued would stay visible
    account = unique("acc")
    batch = [segment_message(0), segment_message(1), build(2), segment_message(3)]
    response = await post_segment(running, account, {"batch": batch, "sentAt": iso(now())})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "validation_failed" and body["code"] == "validation_failed"
    problem = body["details"][0]
    assert (problem["index"], problem["field"]) == (2, field)
    assert fragment in problem["message"]
    assert fragment in body["message"]  # the line the SDK logs says why
    assert_nothing_stored(running, account)


POSTHOG_BAD: list[tuple[str, Any, str | None, str]] = [
    ("missing uuid", lambda n: posthog_event(n, uuid=None), "uuid", "dedupe"),
    ("missing distinct_id", lambda n: posthog_event(n, distinct_id=None), "distinct_id",
     "required"),
    ("missing event", lambda n: posthog_event(n, event=None), "event", "required"),
    ("NUL in a property", lambda n: posthog_event(n, properties={"a": "\x00"}), "properties",
     "NUL"),
    ("timestamp too old", lambda n: posthog_event(n, timestamp=iso(now() - timedelta(days=8))),
     "timestamp", "retention"),
]  # fmt: skip


async def test_keys_the_store_cannot_hold_are_renamed_not_refused(app: AppFactory) -> None:
    """posthog-js and pages put "$" first and "." inside keys at any depth ($set_once's
    $initial_* keys): they are renamed ("$" dropped, "." to "_", "_" first on a clash)."""
    running = await app()
    running.start_flusher()
    account = unique("acc")
    properties = {"a.b": 1, "$": 2, "$lib": "web", "deep": [{"$el_text": "Buy", "x.y": {"$z": 3}}],
                  "$set_once": {"$initial_url": "/", "initial_url": "kept"}}  # fmt: skip
    event = posthog_event(1, properties=properties, **{"$set": {"$email": "a@b.c"}})
    response = await running.client.post("/batch/", json={"api_key": account, "batch": [event]})
    assert response.status_code == 200, response.text
    stored = (await stored_exactly(running, account, [event["uuid"]]))[event["uuid"]]
    assert stored["metadata"]["properties"] == {
        "a_b": 1, "_": 2, "deep": [{"el_text": "Buy", "x_y": {"z": 3}}]}  # fmt: skip
    assert stored["metadata"]["posthog"]["lib"] == "web"
    assert stored["metadata"]["posthog"]["set_once"] == {"_initial_url": "/",
                                                         "initial_url": "kept"}  # fmt: skip
    assert stored["metadata"]["set"] == {"email": "a@b.c"}


@pytest.mark.parametrize(("build", "field", "fragment"), [(b, f, m) for _, b, f, m in POSTHOG_BAD],
                         ids=[c for c, _, _, _ in POSTHOG_BAD])  # fmt: skip
async def test_invalid_posthog_event_refuses_the_whole_batch(
    app: AppFactory, build: Any, field: str | None, fragment: str
) -> None:
    running = await app()
    account = unique("acc")
    batch = [posthog_event(0), build(1), posthog_event(2)]
    response = await running.client.post("/batch/", json={"api_key": account, "batch": batch})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "validation_failed"
    assert (body["details"][0]["index"], body["details"][0]["field"]) == (1, field)
    assert fragment in body["detail"]  # what PostHog's SDK logs
    assert_nothing_stored(running, account)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", "invalid_json"),
        (b"[]", "validation_failed"),
        (b'{"batch": {}}', "validation_failed"),
        (b'{"batch": [], "sentAt": "yesterday"}', "validation_failed"),
        (b'{"batch": []}', "validation_failed"),
        (b"[" * 100_000, "bad_request"),
    ],
)
async def test_malformed_sdk_bodies(app: AppFactory, payload: bytes, error: str) -> None:
    running = await app()
    account = unique("acc")
    response = await running.client.post("/v1/batch", content=payload, headers=basic(account))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert_nothing_stored(running, account)


async def test_sdk_routes_share_the_queue_bound(app: AppFactory) -> None:
    running = await app(queue_max_events=3)  # no flusher: the queue fills
    account = unique("acc")
    assert (await running.post([make_event(account, i) for i in range(3)])).status_code == 202
    shed = await post_segment(running, account, {"batch": [segment_message(9)]})
    assert shed.status_code == 503
    assert shed.json()["code"] == "overloaded" and shed.headers["retry-after"]
    ph = await running.client.post(
        "/batch/", json={"api_key": account, "batch": [posthog_event(9)]}
    )
    assert ph.status_code == 503 and "full" in ph.json()["detail"]
    assert running.backends.queue_depth() == 3


async def test_sdk_routes_share_the_rate_limit(app: AppFactory) -> None:
    running = await app(rate_limit_events_per_second=5, max_batch_events=5)
    account = unique("acc")
    statuses = []
    for i in range(4):
        response = await post_segment(
            running, account, {"batch": [segment_message(i * 10 + j) for j in range(3)]}
        )
        statuses.append(response.status_code)
    assert 429 in statuses
    assert statuses[0] == 200


json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["$x", "a.b"]), inner, max_size=3)
    ),
    max_leaves=10,
)
message_keys = st.sampled_from(["type", "messageId", "userId", "anonymousId", "event", "name",
                                "properties", "traits", "context", "timestamp", "uuid",
                                "distinct_id", "$set", "originalTimestamp", "groupId"])  # fmt: skip
message_values = json_value | st.sampled_from(["track", "page", "identify", "group", "alias",
                                               "$pageview", "u1", iso(now())])  # fmt: skip
messages = st.dictionaries(message_keys, message_values, max_size=8) | json_value
envelopes = st.fixed_dictionaries(
    {},
    optional={"batch": st.lists(messages, max_size=4) | json_value, "sentAt": message_values,
              "sent_at": message_values, "api_key": st.sampled_from(["acc_f", "", "bad key"])
              | json_value, "writeKey": json_value, "event": message_values,
              "uuid": message_values, "distinct_id": message_values},
)  # fmt: skip
sdk_bodies = st.one_of(
    st.binary(max_size=300),
    envelopes.map(lambda e: json.dumps(e).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=sdk_bodies,
    path=st.sampled_from(["/v1/batch", "/batch/", "/capture/", "/i/v0/e/"]),
    compress=st.booleans(),
    auth=st.sampled_from([{}, basic("acc_f"), {"authorization": "Basic !!"}]),
)
def test_any_body_at_an_sdk_route_gets_200_or_a_json_4xx(
    service: tuple[Service, Backends], body: bytes, path: str, compress: bool,
    auth: dict[str, str],
) -> None:  # fmt: skip
    svc, _ = service
    headers = {"content-type": "application/json", **auth}
    if compress:
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    response = httpx.post(f"{svc.url}{path}", content=body, headers=headers, timeout=30)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code >= 400:
        answer = response.json()
        assert answer["error"] and answer["message"]
        assert answer["code" if path == "/v1/batch" else "detail"]


# --- client clock skew -------------------------------------------------------


async def post_envelope(running: Running, sent_at: datetime, events: list[Any]) -> httpx.Response:
    return await running.post({"sent_at": iso(sent_at), "events": events})


async def test_skewed_device_is_corrected_and_keeps_its_own_time(running: Running) -> None:
    account = unique("skew")
    real = now()
    device = real - timedelta(hours=3)  # the device clock is 3 h behind
    events = [make_event(account, i, ts=device - timedelta(seconds=30 - i)) for i in range(3)]
    response = await post_envelope(running, device, events)
    assert response.status_code == 202, response.text
    docs = await stored_exactly(running, account, ["e0", "e1", "e2"])
    for i in range(3):
        doc = docs[f"e{i}"]
        assert doc["original_timestamp"] == ms(device - timedelta(seconds=30 - i))
        # corrected by received - sent_at: about 30 - i seconds before the real now
        assert abs(doc["timestamp"] - (real - timedelta(seconds=30 - i))) < timedelta(seconds=5)
    await summary_agrees(running, account, 3)


async def test_small_skew_and_slow_network_are_not_shifted(running: Running) -> None:
    account = unique("skew")
    stamp = ms(now() - timedelta(minutes=2))
    # device clock 20 s ahead; a batch 45 s on its way (sent_at 45 s ago by a good clock)
    for n, sent_at in ((1, now() + timedelta(seconds=20)), (2, now() - timedelta(seconds=45))):
        response = await post_envelope(running, sent_at, [make_event(account, n, ts=stamp)])
        assert response.status_code == 202
    docs = await stored_exactly(running, account, ["e1", "e2"])
    for doc in docs.values():
        assert doc["timestamp"] == stamp
        assert "original_timestamp" not in doc


async def test_threshold_zero_always_shifts(app: AppFactory) -> None:
    running = await app(clock_skew_threshold_seconds=0)
    running.start_flusher()
    account = unique("skew")
    stamp = ms(now() - timedelta(minutes=2))
    response = await post_envelope(running, now() - timedelta(seconds=45),
                                   [make_event(account, 1, ts=stamp)])  # fmt: skip
    assert response.status_code == 202
    doc = (await stored_exactly(running, account, ["e1"]))["e1"]
    assert doc["original_timestamp"] == stamp
    assert doc["timestamp"] - stamp >= timedelta(seconds=44)


async def test_order_within_a_batch_is_preserved(running: Running) -> None:
    account = unique("skew")
    device = now() + timedelta(hours=5)  # 5 h ahead: every time would be in the future
    base = device - timedelta(seconds=10)
    gaps = [0, 1, 2, 5, 40, 41, 900, 901, 1500, 3000]  # milliseconds
    events = [make_event(account, i, ts=base + timedelta(milliseconds=g))
              for i, g in enumerate(gaps)]  # fmt: skip
    response = await post_envelope(running, device, events)
    assert response.status_code == 202, response.text
    docs = await stored_exactly(running, account, [e["event_id"] for e in events])
    stored = [docs[f"e{i}"]["timestamp"] for i in range(len(gaps))]
    assert stored == sorted(stored)
    assert len(set(stored)) == len(stored)
    first = stored[0]
    for ts, gap in zip(stored, gaps, strict=True):
        # one shift for all: the gaps stay (MongoDB keeps milliseconds)
        assert abs((ts - first) - timedelta(milliseconds=gap)) <= timedelta(milliseconds=1)


async def test_bounds_apply_after_the_correction(app: AppFactory) -> None:
    running = await app()  # no flusher: a refused batch must leave nothing behind
    account = unique("skew")
    device = now() - timedelta(hours=3)
    # an hour ahead of the device's own clock: valid as sent (2 h ago), 1 h in the future after
    late = make_event(account, 1, ts=device + timedelta(hours=1))
    refused = await post_envelope(running, device, [make_event(account, 0, ts=device), late])
    assert refused.status_code == 400
    problem = refused.json()["details"][0]
    assert (problem["index"], problem["field"]) == (1, "timestamp")
    assert "future" in problem["message"] and "correcting the client clock" in problem["message"]
    assert_nothing_stored(running, account)
    # 7 days and 1 hour old as sent, by a device clock 2 h behind: 6 days 23 h after correction
    behind = now() - timedelta(hours=2)
    old = make_event(account, 2, ts=now() - timedelta(days=7, hours=1))
    assert (await running.post([old])).status_code == 400  # as sent: beyond retention
    accepted = await post_envelope(running, behind, [old])
    assert accepted.status_code == 202, accepted.text
    running.start_flusher()
    doc = (await stored_exactly(running, account, ["e2"]))["e2"]
    assert now() - doc["timestamp"] < timedelta(days=7)


async def test_sdk_envelopes_are_corrected_too(running: Running) -> None:
    account = unique("skew")
    device = now() - timedelta(hours=6)
    stamp = ms(device - timedelta(seconds=10))
    segment = await post_segment(running, account, {
        "batch": [segment_message(1, timestamp=iso(stamp))], "sentAt": iso(device)})  # fmt: skip
    assert segment.status_code == 200, segment.text
    posthog = await running.client.post("/batch/", json={
        "api_key": account, "sent_at": iso(device),
        "batch": [posthog_event(2, timestamp=iso(stamp))]})  # fmt: skip
    assert posthog.status_code == 200, posthog.text
    docs = await stored_exactly(running, account, ["m1", posthog_event(2)["uuid"]])
    for doc in docs.values():
        assert doc["original_timestamp"] == stamp
        assert abs(doc["timestamp"] - (now() - timedelta(seconds=10))) < timedelta(seconds=10)


async def test_events_envelope_without_sent_at_and_original_timestamp_given(
    running: Running,
) -> None:
    account = unique("env")
    stamp = ms(now() - timedelta(minutes=1))
    given = iso(ms(now() - timedelta(days=30)))
    plain = await running.post({"events": [make_event(account, 1, ts=stamp)]})
    assert plain.status_code == 202, plain.text
    direct = await running.post([make_event(account, 2, ts=stamp, original_timestamp=given)])
    assert direct.status_code == 202, direct.text
    # shifted, but the client's original_timestamp given directly stays as given
    device = now() + timedelta(hours=2)
    kept = await post_envelope(running, device, [make_event(account, 3, ts=device,
                                                            original_timestamp=given)])  # fmt: skip
    assert kept.status_code == 202, kept.text
    docs = await stored_exactly(running, account, ["e1", "e2", "e3"])
    assert docs["e1"]["timestamp"] == stamp and "original_timestamp" not in docs["e1"]
    assert docs["e2"]["original_timestamp"] == parse_iso(given)
    assert docs["e3"]["original_timestamp"] == parse_iso(given)
    assert abs(docs["e3"]["timestamp"] - now()) < timedelta(seconds=10)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sent_at": "yesterday", "events": []}, "sent_at"),
        ({"sent_at": "2026-01-01T00:00:00", "events": []}, "sent_at"),
        ({"events": [], "extra": 1}, "extra"),
        ({"sent_at": "2026-01-01T00:00:00Z"}, "events"),
    ],
)
async def test_bad_envelopes_are_refused(app: AppFactory, body: Any, field: str) -> None:
    running = await app()
    account = unique("env")
    if "events" in body:
        body["events"] = [make_event(account, 1)]
    response = await running.post(body)
    assert response.status_code == 400
    assert response.json()["details"][0]["field"] == field
    assert_nothing_stored(running, account)
