"""Every kind of bad input: a clear 4xx, and nothing from the request is stored.

"Nothing stored" is checked against the real servers, everywhere something
could have gone: the stream, its depth counter, the dead-letter stream, the
live tail and the raw events (the app runs in-process, without a flusher, so
anything enqueued would still be in the stream).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import AppFactory, Running
from tests.support import drained, eventually, make_event, unique


def good(account: str, n: int = 0, **extra: Any) -> dict[str, Any]:
    return make_event(account, n, **extra)


def ago(delta: timedelta) -> datetime:
    return datetime.now(UTC) - delta


def without(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != key}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


# (case id, event builder taking the account, field named in the details)
BAD_EVENTS: list[tuple[str, Any, str | None]] = [
    ("missing event_id", lambda a: without(good(a), "event_id"), "event_id"),
    ("missing account_id", lambda a: without(good(a), "account_id"), "account_id"),
    ("missing user_id", lambda a: without(good(a), "user_id"), "user_id"),
    ("missing type", lambda a: without(good(a), "type"), "type"),
    ("missing timestamp", lambda a: without(good(a), "timestamp"), "timestamp"),
    ("unknown field", lambda a: good(a, extra_field=1), "extra_field"),
    ("typo'd field", lambda a: {**without(good(a), "type"), "tpye": "x"}, "tpye"),
    ("event_id empty", lambda a: good(a, event_id=""), "event_id"),
    ("event_id too long", lambda a: good(a, event_id="e" * 129), "event_id"),
    ("event_id bad char", lambda a: good(a, event_id="e 1"), "event_id"),
    ("event_id slash", lambda a: good(a, event_id="e/1"), "event_id"),
    ("event_id trailing newline", lambda a: good(a, event_id="e1\n"), "event_id"),
    ("event_id not a string", lambda a: good(a, event_id=5), "event_id"),
    ("account_id too long", lambda a: good(a, account_id=a + "x" * 64), "account_id"),
    ("account_id pipe", lambda a: good(a, account_id=a + "|x"), "account_id"),
    ("user_id empty", lambda a: good(a, user_id=""), "user_id"),
    ("user_id too long", lambda a: good(a, user_id="u" * 129), "user_id"),
    ("user_id control char", lambda a: good(a, user_id="u\x07"), "user_id"),
    ("user_id newline", lambda a: good(a, user_id="u\n"), "user_id"),
    ("user_id null", lambda a: good(a, user_id=None), "user_id"),
    ("type upper case", lambda a: good(a, type_="Login"), "type"),
    ("type too long", lambda a: good(a, type_="t" * 65), "type"),
    ("type space", lambda a: good(a, type_="page view"), "type"),
    ("timestamp no zone", lambda a: good(a, timestamp="2026-01-01T00:00:00"), "timestamp"),
    ("timestamp not a date", lambda a: good(a, timestamp="yesterday"), "timestamp"),
    ("timestamp a number", lambda a: good(a, timestamp=1700000000), "timestamp"),
    ("timestamp 6 min ahead", lambda a: good(a, ts=ago(-timedelta(minutes=6))), "timestamp"),
    ("timestamp past retention", lambda a: good(a, ts=ago(timedelta(days=7, hours=1))),
     "timestamp"),
    ("metadata not an object", lambda a: good(a, metadata=[1, 2]), "metadata"),
    ("metadata a string", lambda a: good(a, metadata="x"), "metadata"),
    ("metadata too large", lambda a: good(a, metadata={"k": "v" * 9000}), "metadata"),
    ("metadata 9 deep", lambda a: good(a, metadata=nested(9)), "metadata"),
    ("metadata $ key", lambda a: good(a, metadata={"$where": 1}), "metadata"),
    ("metadata dotted key", lambda a: good(a, metadata={"a.b": 1}), "metadata"),
    ("metadata array in array", lambda a: good(a, metadata={"m": [[1, 2]]}), "metadata"),
    ("metadata huge int", lambda a: good(a, metadata={"n": 2**64}), "metadata"),
    ("metadata NUL in a value", lambda a: good(a, metadata={"s": "a\x00b"}), "metadata"),
    ("metadata NUL deep", lambda a: good(a, metadata={"l": [{"s": "\x00"}]}), "metadata"),
]  # fmt: skip


@pytest.fixture
async def running(app: AppFactory) -> Running:
    return await app()


def assert_nothing_stored(running: Running, account: str) -> None:
    backends = running.backends
    assert backends.stream_entries() == 0
    assert backends.queue_depth() == 0
    assert backends.dead_letters() == []
    assert backends.tail_events(account) == 0
    assert backends.count(account) == 0


@pytest.mark.parametrize(("build", "field"), [(b, f) for _, b, f in BAD_EVENTS],
                         ids=[c for c, _, _ in BAD_EVENTS])  # fmt: skip
async def test_bad_event_is_refused_with_details_and_batch_stores_nothing(
    running: Running, build: Any, field: str | None
) -> None:
    account = unique("acc")
    batch = [good(account, 1), good(account, 2), build(account), good(account, 3)]
    response = await running.post(batch)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["details"], body
    problem = body["details"][0]
    assert problem["index"] == 2
    assert problem["field"] == field
    assert problem["message"]
    assert_nothing_stored(running, account)


async def test_reports_each_bad_event_up_to_fifty(running: Running) -> None:
    account = unique("acc")
    batch = [good(account, i, type_="BAD") for i in range(80)]
    body = (await running.post(batch)).json()
    assert [d["index"] for d in body["details"]] == list(range(50))
    assert_nothing_stored(running, account)


async def test_semantic_problems_are_listed_per_event(running: Running) -> None:
    account = unique("acc")
    batch = [
        good(account, 0),
        good(account, 1, ts=datetime.now(UTC) + timedelta(hours=1)),
        good(account, 2, metadata=nested(12)),
    ]
    body = (await running.post(batch)).json()
    assert [(d["index"], d["field"]) for d in body["details"]] == [
        (1, "timestamp"),
        (2, "metadata"),
    ]
    assert_nothing_stored(running, account)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[{", "invalid_json"),
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b'[{"event_id": "\\ud800"}]', "invalid_json"),
        (b"{}", "validation_failed"),
        (b'{"events": []}', "validation_failed"),
        (b"[]", "validation_failed"),
        (b"[1, 2]", "validation_failed"),
        (b"null", "validation_failed"),
    ],
)
async def test_malformed_bodies(running: Running, payload: bytes, error: str) -> None:
    response = await running.client.post(
        "/events", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert running.backends.stream_entries() == 0


async def test_too_many_events(running: Running) -> None:
    account = unique("acc")
    response = await running.post([good(account, i) for i in range(1001)])
    assert response.status_code == 400
    assert "at most 1000" in response.json()["details"][0]["message"]
    assert_nothing_stored(running, account)


async def test_body_too_large(running: Running) -> None:
    account = unique("acc")
    padding = "x" * 1100
    batch = [good(account, i, metadata={"p": padding}) for i in range(1000)]
    response = await running.client.post(
        "/events",
        content=json.dumps(batch).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert_nothing_stored(running, account)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_wrong_content_type(running: Running, content_type: str | None) -> None:
    account = unique("acc")
    headers = {"content-type": content_type} if content_type else {}
    response = await running.client.post(
        "/events", content=json.dumps([good(account)]).encode(), headers=headers
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert_nothing_stored(running, account)


async def test_content_type_with_charset_is_json(running: Running) -> None:
    account = unique("acc")
    response = await running.client.post(
        "/events",
        content=json.dumps([good(account)]).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202
    running.start_flusher()
    await eventually(drained(running.backends, account, 1))


async def test_unknown_routes_and_methods_answer_json(running: Running) -> None:
    missing = await running.client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong = await running.client.get("/events")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"


def deep(depth: int, open_: str = '{"a":', close: str = "}") -> bytes:
    return (open_ * depth + "1" + close * depth).encode()


@pytest.mark.parametrize(
    "metadata",
    [deep(5000), deep(5000, "[", "]"), deep(100_000), deep(900), deep(2000, '{"a":[', "]}")],
    ids=["objects 5000 deep", "arrays 5000 deep", "objects 100k deep", "900 deep",
         "mixed 4000 deep"],
)  # fmt: skip
async def test_deeply_nested_metadata_is_a_400_never_a_500(
    running: Running, metadata: bytes
) -> None:
    account = unique("deep")
    head = json.dumps(good(account))[:-1].encode()
    body = b"[" + head + b', "metadata": ' + metadata + b"}]"
    response = await running.client.post(
        "/events", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    details = response.json()["details"]
    assert details[0]["field"] == "metadata" and "deep" in details[0]["message"]
    assert_nothing_stored(running, account)
