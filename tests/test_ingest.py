"""The 202 path: what is accepted is stored exactly once, in the documented shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Backends, Service, drained, ids, iso, make_event, unique, wait_for


def test_accepted_batch_is_stored_once_with_utc_times(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    plus_two = timezone(timedelta(hours=2))
    batch = [
        make_event(account, 1, ts=sent_at, metadata={"page": "/home", "tags": ["a", {"b": 1}]}),
        {**make_event(account, 2), "timestamp": sent_at.astimezone(plus_two).isoformat()},
    ]
    response = svc.post(batch)
    assert response.status_code == 202
    assert response.json() == {"status": "queued", "count": 2}
    wait_for(drained(backends, account, 2), what="both events stored")
    docs = {d["event_id"]: d for d in backends.stored(account)}
    first, second = docs["e1"], docs["e2"]
    assert first["_id"] == f"{account}|e1"
    assert first["timestamp"] == sent_at
    assert second["timestamp"] == sent_at  # +02:00 input stored as the same UTC instant
    assert first["hour"] == sent_at.replace(minute=0, second=0)
    assert first["batch"] == second["batch"]  # the stream entry that stored both
    assert first["metadata"] == {"page": "/home", "tags": ["a", {"b": 1}]}
    assert "metadata" not in second
    assert first["ingested_at"] >= sent_at


def test_resent_batches_and_in_batch_duplicates_are_stored_once(
    service: tuple[Service, Backends],
) -> None:
    svc, backends = service
    account = unique("acc")
    batch = [make_event(account, i) for i in range(20)]
    batch += batch[:5]  # duplicates inside the batch
    for _ in range(3):  # and the whole batch re-sent
        assert svc.post(batch).status_code == 202
    wait_for(drained(backends, account, 20), what="20 distinct events")
    assert ids(backends.stored(account)) == sorted(f"e{i}" for i in range(20))


def test_same_event_id_in_two_accounts_is_two_events(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    a, b = unique("acc"), unique("acc")
    assert svc.post([make_event(a, 1), make_event(b, 1)]).status_code == 202
    wait_for(lambda: backends.count(a) == 1 and backends.count(b) == 1)


def test_first_write_wins_for_a_reused_event_id(service: tuple[Service, Backends]) -> None:
    svc, backends = service
    account = unique("acc")
    assert svc.post([make_event(account, 1, user="first")]).status_code == 202
    wait_for(drained(backends, account, 1))
    assert svc.post([make_event(account, 1, user="second")]).status_code == 202
    marker = unique("marker")
    assert svc.post([make_event(marker, 1)]).status_code == 202
    wait_for(drained(backends, marker, 1))
    assert [d["user_id"] for d in backends.stored(account)] == ["first"]


ids_alphabet = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=20,
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    # NUL is refused in metadata strings (PostgreSQL cannot store it): a valid batch has none
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=20),
)  # fmt: skip
metadata = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("$") and "." not in k
                                            and "\x00" not in k),
    st.recursive(json_leaf, lambda inner: st.lists(inner.filter(lambda v: not isinstance(v, list)),
                                                   max_size=3)
                 | st.dictionaries(st.sampled_from("abc"), inner, max_size=3), max_leaves=8),
    max_size=4,
)  # fmt: skip


@st.composite
def batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    now = datetime.now(UTC).replace(microsecond=0)  # MongoDB keeps milliseconds
    size = draw(st.integers(1, 40))
    event_ids = draw(st.lists(ids_alphabet, min_size=size, max_size=size, unique=True))
    events = []
    for event_id in event_ids:
        offset = draw(st.integers(-6 * 24 * 3600 * 1000, 240 * 1000))
        event: dict[str, Any] = {
            "event_id": event_id,
            "user_id": draw(
                st.text(
                    alphabet=st.characters(blacklist_categories=("Cc", "Cs")),
                    min_size=1,
                    max_size=30,
                )
            ),
            "type": draw(st.sampled_from(["page_view", "message_sent", "call_made", "login"])),
            "timestamp": iso(now + timedelta(milliseconds=offset)),
        }
        if draw(st.booleans()):
            event["metadata"] = draw(metadata)
        events.append(event)
    repeats = draw(st.lists(st.sampled_from(events), max_size=5))  # exact re-sends
    return events + [dict(e) for e in repeats]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches())
def test_random_valid_batches_are_stored_exactly(
    service: tuple[Service, Backends], batch: list[dict[str, Any]]
) -> None:
    svc, backends = service
    account = unique("prop")
    for event in batch:
        event["account_id"] = account
    response = svc.post(batch)
    assert response.status_code == 202, response.text
    assert response.json()["count"] == len(batch)
    expected = {e["event_id"]: e for e in batch}
    wait_for(drained(backends, account, len(expected)), what=f"{len(expected)} events")
    for doc in backends.stored(account):
        sent = expected[doc["event_id"]]
        assert doc["user_id"] == sent["user_id"]
        assert doc["type"] == sent["type"]
        assert iso(doc["timestamp"]) == sent["timestamp"]
        assert doc.get("metadata") == sent.get("metadata")
