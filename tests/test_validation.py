"""Every kind of bad input: a clear 4xx, and nothing from the request is stored.

"Nothing stored" is checked against the real servers: after each refused
request a valid marker batch is sent and waited for; the stream is FIFO, so
once the marker is in MongoDB anything enqueued before it would be too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.support import Backends, Service, make_event, unique, wait_for


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
]  # fmt: skip


def assert_nothing_stored(service: Service, backends: Backends, account: str) -> None:
    marker = unique("marker")
    assert service.post([good(marker)]).status_code == 202
    wait_for(lambda: backends.count(marker) == 1, 30, what="the marker batch to be stored")
    assert backends.count(account) == 0


@pytest.mark.parametrize(("build", "field"), [(b, f) for _, b, f in BAD_EVENTS],
                         ids=[c for c, _, _ in BAD_EVENTS])  # fmt: skip
def test_bad_event_is_refused_with_details_and_batch_stores_nothing(
    service: tuple[Service, Backends], build: Any, field: str | None
) -> None:
    svc, backends = service
    account = unique("acc")
    batch = [good(account, 1), good(account, 2), build(account), good(account, 3)]
    response = svc.post(batch)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "validation_failed"
    assert body["details"], body
    problem = body["details"][0]
    assert problem["index"] == 2
    assert problem["field"] == field
    assert problem["message"]
    assert_nothing_stored(svc, backends, account)


def test_reports_each_bad_event_up_to_fifty(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    batch = [good(account, i, type_="BAD") for i in range(80)]
    body = svc.post(batch).json()
    assert [d["index"] for d in body["details"]] == list(range(50))
    assert_nothing_stored(svc, backends, account)


def test_semantic_problems_are_listed_per_event(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    batch = [
        good(account, 0),
        good(account, 1, ts=datetime.now(UTC) + timedelta(hours=1)),
        good(account, 2, metadata=nested(12)),
    ]
    body = svc.post(batch).json()
    assert [(d["index"], d["field"]) for d in body["details"]] == [
        (1, "timestamp"),
        (2, "metadata"),
    ]
    assert_nothing_stored(svc, backends, account)


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
def test_malformed_bodies(service: tuple[Service, Backends], payload: bytes, error: str) -> None:
    svc, _ = service
    response = httpx.post(
        f"{svc.url}/events", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == error


def test_too_many_events(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    response = svc.post([good(account, i) for i in range(1001)])
    assert response.status_code == 400
    assert "at most 1000" in response.json()["details"][0]["message"]
    assert_nothing_stored(svc, backends, account)


def test_body_too_large(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    padding = "x" * 1100
    batch = [good(account, i, metadata={"p": padding}) for i in range(1000)]
    response = httpx.post(
        f"{svc.url}/events",
        content=json.dumps(batch).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert_nothing_stored(svc, backends, account)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type(service: tuple[Service, Backends], content_type: str | None) -> None:
    svc, backends = service
    account = unique("acc")
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(
        f"{svc.url}/events", content=json.dumps([good(account)]).encode(), headers=headers
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert_nothing_stored(svc, backends, account)


def test_content_type_with_charset_is_json(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    response = httpx.post(
        f"{svc.url}/events",
        content=json.dumps([good(account)]).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202
    wait_for(lambda: backends.count(account) == 1)


def test_unknown_routes_and_methods_answer_json(service: tuple[Service, Backends]) -> None:
    svc, _ = service
    missing = httpx.get(f"{svc.url}/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong = httpx.get(f"{svc.url}/events")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"
