"""Pure functions: settings, the validator, bucket maths, packing, combining figures."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.api_keys import bootstrap_keys
from core.buckets import (
    DAY,
    HOUR,
    MINUTE,
    WINDOWS,
    Counts,
    Packed,
    pack,
    top_users,
    window_start,
)
from core.events import (
    TYPE_PATTERN,
    Event,
    EventSchema,
    Limits,
    NotJSON,
    clock_shift,
    decode_events,
    encode_events,
    now_utc,
    to_document,
    unwrap_envelope,
    validate_batch,
)
from core.figures import Figures, combine
from core.settings import SettingsError, load_settings
from core.tail import TailEvents, encode, parse_entries, parse_id
from scripts.bench_rollups import label, wait_for_pass
from service.caches import SingleFlight
from service.errors import BadRequest, BodyTooLarge
from service.sdk_bodies import gunzip
from service.sdk_messages import FALLBACK_TYPE, type_from_name

LIMITS = Limits(1000, timedelta(minutes=5), timedelta(days=7), 8192, 8)


def test_defaults_match_the_documented_configuration() -> None:
    s = load_settings({})
    assert (s.port, s.flush_batch_size, s.flush_interval_ms) == (8000, 500, 250)
    assert s.max_body_bytes == 1024 * 1024 and s.max_batch_events == 1000
    assert s.raw_retention_days == 7 and s.var_dir == Path("var")
    assert s.api_keys == {} and s.auth == "open" and not s.keys_required


def test_environment_overrides_are_typed() -> None:
    s = load_settings({"PORT": "9001", "ROLES": "http, rollups", "VAR_DIR": "/x",
                       "API_KEYS": "k1=a|b,k2=*@admin,k3=c@write",
                       "ROLLUP_INTERVAL_SECONDS": "2.5"})  # fmt: skip
    assert s.port == 9001 and s.var_dir == Path("/x")
    assert s.runs("http") and s.runs("rollups") and not s.runs("flusher")
    assert s.api_keys == {"k1": ("read+write", frozenset({"a", "b"})),
                          "k2": ("admin", frozenset({"*"})),
                          "k3": ("write", frozenset({"c"}))}  # fmt: skip
    assert s.keys_required
    boot = {k.label + k.scope: k for k in bootstrap_keys(s.api_keys).values()}
    assert boot["API_KEYSread+write"].may("read", "a") and not boot["API_KEYSadmin"].may("x", "a")
    assert boot["API_KEYSadmin"].may("write", "anything")
    assert not boot["API_KEYSwrite"].may("read", "c") and boot["API_KEYSwrite"].may("write", "c")
    assert s.rollup_interval_seconds == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "eighty"}, "PORT='eighty' is not a valid int"),
        ({"WORKERS": "0"}, "WORKERS must be positive"),
        ({"ROLES": "http,cron"}, "ROLES must be a comma-separated subset"),
        ({"API_KEYS": "justakey"}, "API_KEYS must look like"),
        ({"MINUTE_RETENTION_HOURS": "12"}, "MINUTE_RETENTION_HOURS must be at least 25"),
        ({"HOUR_RETENTION_DAYS": "7"}, "HOUR_RETENTION_DAYS must be at least 31"),
        ({"PORT": "70000"}, "PORT must be at most 65535"),
        ({"CLOCK_SKEW_THRESHOLD_SECONDS": "-1"}, "CLOCK_SKEW_THRESHOLD_SECONDS must be"),
        ({"CLOCK_SKEW_THRESHOLD_SECONDS": "nan"}, "CLOCK_SKEW_THRESHOLD_SECONDS must be"),
        # a batch over a second's allowance would be a 429 every time it is retried
        ({"RATE_LIMIT_EVENTS_PER_SECOND": "100"},
         "RATE_LIMIT_EVENTS_PER_SECOND=100 is below MAX_BATCH_EVENTS=1000"),
        ({"RATE_LIMIT_EVENTS_PER_SECOND": "50", "MAX_BATCH_EVENTS": "51"},
         "RATE_LIMIT_EVENTS_PER_SECOND=50 is below MAX_BATCH_EVENTS=51"),
        ({"RATE_LIMIT_EVENTS_PER_SECOND": "-5"}, "RATE_LIMIT_EVENTS_PER_SECOND may not be"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(env)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["event_id", "account_id", "user_id", "type", "timestamp", "metadata",
                         "x"]), inner, max_size=6),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_validator_refuses_any_other_body_and_says_why(body: bytes) -> None:
    """None of these bodies is a batch of valid events (a timestamp takes 20 characters
    or more, these strings 10 at most): each is not JSON, or refused with 1..50 reasons
    that each point into the batch."""
    try:
        _, problems = validate_batch(body, LIMITS, now_utc())
    except NotJSON:
        return
    assert 1 <= len(problems) <= 50, problems
    assert all(problem.message for problem in problems)
    try:
        items = json.loads(body)
    except ValueError:  # not an array: refused before reading further
        assert all(problem.index is None for problem in problems), problems
        return
    for problem in problems:
        if problem.index is not None:
            assert isinstance(items, list) and 0 <= problem.index < len(items), problem


valid_events = st.lists(
    st.fixed_dictionaries({
        "account_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
        "user_id": st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
                           min_size=1, max_size=20),
        "type": st.from_regex(r"[a-z0-9_.:-]{1,64}", fullmatch=True),
        "seconds_ago": st.integers(0, 6 * 24 * 3600),
    }),
    min_size=1, max_size=5,
)  # fmt: skip
breakages = {"event_id": "", "account_id": "a b", "user_id": "\x00", "type": "Upper",
             "timestamp": "yesterday", "metadata": []}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    batch=valid_events,
    broken=st.none() | st.tuples(st.integers(0, 4), st.sampled_from(sorted(breakages))),
)
def test_validator_takes_a_valid_batch_whole_or_names_the_broken_field(
    batch: list[dict[str, Any]], broken: tuple[int, str] | None
) -> None:
    now = now_utc()
    events = [{"event_id": f"e{i}", "account_id": e["account_id"], "user_id": e["user_id"],
               "type": e["type"], "timestamp": (now - timedelta(seconds=e["seconds_ago"]))
               .isoformat()} for i, e in enumerate(batch)]  # fmt: skip
    if broken is not None and broken[0] < len(events):
        index, field = broken
        events[index][field] = breakages[field]
        _, problems = validate_batch(json.dumps(events).encode(), LIMITS, now)
        assert [(p.index, p.field) for p in problems] == [(index, field)], problems
        return
    taken, problems = validate_batch(json.dumps(events).encode(), LIMITS, now)
    assert problems == []
    assert [(e.event_id, e.account_id, e.user_id, e.type) for e in taken] == [
        (e["event_id"], e["account_id"], e["user_id"], e["type"]) for e in events
    ]


field_text = st.text(
    st.characters(codec="utf-8") | st.sampled_from("aZ09_.:-|$ \n\x00\x7f\x85\x9f\u00a0é"),
    min_size=1,
    max_size=12,
)


@settings(max_examples=1000, deadline=None)
@given(
    event_id=field_text,
    account_id=field_text,
    user_id=field_text,
    type_=field_text,
    n=st.integers(1, 3),
)
def test_batch_charset_check_agrees_with_the_documented_patterns(
    event_id: str, account_id: str, user_id: str, type_: str, n: int
) -> None:
    """The hot path checks charsets once per batch; the per-field patterns are the spec."""
    event = {"event_id": event_id, "account_id": account_id, "user_id": user_id, "type": type_,
             "timestamp": now_utc().isoformat()}  # fmt: skip
    good = {"event_id": "e1", "account_id": "a", "user_id": "u", "type": "login",
            "timestamp": now_utc().isoformat()}  # fmt: skip
    body = json.dumps([good] * (n - 1) + [event]).encode()
    try:
        msgspec.json.decode(json.dumps(event).encode(), type=EventSchema)
        strict_ok = True
    except msgspec.ValidationError:
        strict_ok = False
    events, problems = validate_batch(body, LIMITS, now_utc())
    assert bool(events) and not problems if strict_ok else (not events and problems)
    if not strict_ok:
        assert {p.index for p in problems} == {n - 1}


async def test_single_flight_shares_one_computation_per_key() -> None:
    flights, calls = SingleFlight(), []
    release = asyncio.Event()

    async def compute(tag: str) -> str:
        calls.append(tag)
        await release.wait()
        return tag

    tasks = [asyncio.ensure_future(flights.run("k", lambda: compute("a"))) for _ in range(5)]
    other = asyncio.ensure_future(flights.run("other", lambda: compute("b")))
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == ["a"] * 5 and await other == "b"
    assert sorted(calls) == ["a", "b"]
    assert await flights.run("k", lambda: compute("c")) == "c"  # done flights are not reused


async def test_single_flight_failures_reach_every_joiner_and_cancels_hand_over() -> None:
    flights = SingleFlight()
    gate = asyncio.Event()

    async def fail() -> str:
        await gate.wait()
        raise RuntimeError("mongo down")

    tasks = [asyncio.ensure_future(flights.run("k", fail)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def slow() -> str:
        await asyncio.sleep(10)
        return "slow"

    async def fast() -> str:
        return "fast"

    leader = asyncio.ensure_future(flights.run("k", slow))
    await asyncio.sleep(0)
    joiner = asyncio.ensure_future(flights.run("k", fast))
    await asyncio.sleep(0)
    leader.cancel()
    assert await joiner == "fast"


def test_windows_start_on_a_minute_or_on_an_hour() -> None:
    minute = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE + 37 * MINUTE
    assert window_start("15m", minute) == minute - 15 * MINUTE
    assert window_start("24h", minute) == minute - DAY
    assert window_start("7d", minute) % HOUR == 0
    assert minute - window_start("7d", minute) - 7 * DAY < HOUR


def test_top_users_ties_are_broken_by_user_id() -> None:
    users = {"b": 2, "a": 2, "c": 3, "d": 1}
    assert top_users(users, 3) == [("c", 3), ("a", 2), ("b", 2)]


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1,
                max_size=8)  # fmt: skip
user_counts = st.dictionaries(names, st.integers(1, 50), max_size=150)


@settings(max_examples=200, deadline=None)
@given(users=user_counts, types=st.dictionaries(st.sampled_from("abc"), st.integers(1, 9)))
def test_packed_counts_unpack_to_the_same_figures(users: dict[str, int], types: dict[str, int]):
    counts = Counts(sum(types.values()), types, users)
    packed = Packed.of(pack(counts))
    assert packed.unpack() == counts
    assert packed.unique_users == len(users)
    assert packed.top == top_users(users, 100)
    index = packed.index()
    assert all(index.get(u) == n for u, n in users.items())


@settings(max_examples=300, deadline=None)
@given(base=user_counts, extra=user_counts, gone=st.data())
def test_combining_an_aggregate_with_tail_and_left_buckets_is_exact(
    base: dict[str, int], extra: dict[str, int], gone: st.DataObject
) -> None:
    """The summary's shortcut (top 100 + touched users) equals counting everything."""
    left = {u: gone.draw(st.integers(1, n)) for u, n in base.items()
            if gone.draw(st.booleans())}  # fmt: skip
    packed = Packed.of(pack(Counts(sum(base.values()), {"t": sum(base.values())}, base)))
    tail = Counts(sum(extra.values()), {"t": sum(extra.values())} if extra else {}, extra)
    gone_counts = Counts(sum(left.values()), {"t": sum(left.values())} if left else {}, left)
    figures = Figures("a", "24h", 0, 1)
    combine(figures, packed, tail, gone_counts)
    expected = dict(base)
    for u, n in left.items():
        expected[u] -= n
    for u, n in extra.items():
        expected[u] = expected.get(u, 0) + n
    expected = {u: n for u, n in expected.items() if n}
    assert figures.total == sum(expected.values())
    assert figures.unique_users == len(expected)
    assert figures.top == top_users(expected, 100)


def test_tail_entries_round_trip() -> None:
    events = TailEvents([1, 2], ["login", "page_view"], ["u1", "ü"])
    [entry] = parse_entries(3, [(b"1700000000000-4", {b"e": encode(events)})])
    assert entry.partition == 3 and entry.entry_id == (1700000000000, 4)
    assert entry.events == events and entry.newest == 2
    assert parse_id("5-0") < parse_id("5-1") < parse_id("6-0")
    assert len(WINDOWS) == 6


def test_a_rate_limit_at_least_the_largest_batch_is_accepted() -> None:
    assert (
        load_settings({"RATE_LIMIT_EVENTS_PER_SECOND": "1000"}).rate_limit_events_per_second == 1000
    )
    limited = load_settings({"RATE_LIMIT_EVENTS_PER_SECOND": "100", "MAX_BATCH_EVENTS": "100"})
    assert (limited.rate_limit_events_per_second, limited.max_batch_events) == (100, 100)
    assert load_settings({"MAX_BATCH_EVENTS": "5"}).rate_limit_events_per_second == 0  # off


def test_clock_skew_threshold_setting() -> None:
    assert load_settings({}).clock_skew_threshold_seconds == 60
    assert load_settings({"CLOCK_SKEW_THRESHOLD_SECONDS": "0"}).clock_skew_threshold_seconds == 0


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Order Completed", "order_completed"),
        ("$pageview", "pageview"),
        ("$set", "set"),
        ("page_view", "page_view"),
        ("Signed Up!!", "signed_up"),
        ("  Checkout -- Step 2 ", "checkout_--_step_2"),
        ("api:v2.call", "api:v2.call"),
        ("Café Visité", "cafe_visite"),
        ("ＦＵＬＬ width", "full_width"),
        ("日本語", FALLBACK_TYPE),
        ("$$$", FALLBACK_TYPE),
        ("", FALLBACK_TYPE),
        ("A" * 100, "a" * 64),
        ("a" * 63 + " b", "a" * 63),  # no "_" left dangling by the cut
    ],
)
def test_event_names_map_to_types_by_one_rule(name: str, kind: str) -> None:
    assert type_from_name(name) == kind


@settings(max_examples=500, deadline=None)
@given(name=st.text(max_size=100))
def test_every_event_name_maps_to_a_valid_type_and_the_rule_is_idempotent(name: str) -> None:
    kind = type_from_name(name)
    assert re.match(TYPE_PATTERN, kind) and 1 <= len(kind) <= 64
    assert type_from_name(kind) == kind


def test_gunzip_bounds_the_output_and_reads_every_member() -> None:
    assert gunzip(gzip.compress(b"x" * 100), 100) == b"x" * 100
    with pytest.raises(BodyTooLarge):
        gunzip(gzip.compress(b"x" * 101), 100)
    with pytest.raises(BodyTooLarge):  # a bomb stops at the limit, not at its end
        gunzip(gzip.compress(b"\0" * (256 << 20)), 1 << 20)
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd") + b"\0\0", 100) == b"abcd"
    with pytest.raises(BodyTooLarge):  # the limit covers all members together
        gunzip(gzip.compress(b"x" * 60) + gzip.compress(b"x" * 60), 100)
    for bad in (b"", b"plain", gzip.compress(b"abc")[:-3], gzip.compress(b"a") + b"junk"):
        with pytest.raises(BadRequest):
            gunzip(bad, 100)
    # a body of many empty members is refused, not unpacked member after member (each
    # used to copy the rest of the body: quadratic, 0.7 s of CPU for 1 MiB)
    assert gunzip(gzip.compress(b"") * 15 + gzip.compress(b"ok"), 100) == b"ok"
    with pytest.raises(BadRequest, match="more than 16 gzip members"):
        gunzip(gzip.compress(b"") * ((1 << 20) // 20), 1 << 20)


def test_clock_shift_only_beyond_the_threshold() -> None:
    now = now_utc()
    minute = timedelta(seconds=60)
    assert clock_shift(now - timedelta(seconds=59), now, minute) is None  # transit, not skew
    assert clock_shift(now + timedelta(seconds=60), now, minute) is None
    assert clock_shift(now - timedelta(hours=3), now, minute) == timedelta(hours=3)
    assert clock_shift(now + timedelta(seconds=61), now, minute) == timedelta(seconds=-61)
    assert clock_shift(now - timedelta(seconds=1), now, timedelta(0)) == timedelta(seconds=1)


def events_body(*stamps: datetime, **extra: object) -> bytes:
    return json.dumps([{"event_id": f"e{i}", "account_id": "a", "user_id": "u", "type": "t",
                        "timestamp": ts.isoformat(), **extra}
                       for i, ts in enumerate(stamps)]).encode()  # fmt: skip


def test_a_shift_moves_every_timestamp_alike_and_keeps_the_original() -> None:
    now = now_utc()
    device = [now + timedelta(hours=2, seconds=s) for s in (-30, -20, -20, -1)]
    events, problems = validate_batch(events_body(*device), LIMITS, now, timedelta(hours=-2))
    assert problems == []
    assert [e.timestamp for e in events] == [d - timedelta(hours=2) for d in device]
    assert [e.original_timestamp for e in events] == device
    # what the flusher gets back: the corrected batch
    [first, *_] = decode_events(encode_events(events))
    assert first.timestamp == device[0] - timedelta(hours=2)
    doc = to_document(first, "0-1", now)
    assert doc["original_timestamp"] == device[0].astimezone(UTC)
    assert "original_timestamp" not in to_document(Event("e", "a", "u", "t", now), "0-1", now)


def test_bounds_are_checked_after_the_shift() -> None:
    now = now_utc()
    ahead = events_body(now + timedelta(hours=1))
    assert validate_batch(ahead, LIMITS, now)[1]  # an hour in the future as sent
    assert validate_batch(ahead, LIMITS, now, timedelta(hours=-1))[1] == []
    fine = events_body(now - timedelta(hours=1))
    _, problems = validate_batch(fine, LIMITS, now, timedelta(hours=2))
    assert [(p.index, p.field) for p in problems] == [(0, "timestamp")]
    assert "after correcting the client clock by 7200 s" in problems[0].message
    given = datetime(2020, 1, 1, tzinfo=UTC)
    body = events_body(now, original_timestamp=given.isoformat())
    [event], _ = validate_batch(body, LIMITS, now, timedelta(minutes=-2))
    assert event.original_timestamp == given  # given by the client: kept as it is
    huge = events_body(datetime(9999, 12, 31, 23, 0, tzinfo=UTC))
    assert validate_batch(huge, LIMITS, now, timedelta(days=1))[1][0].field == "timestamp"


def test_events_envelope_is_unwrapped_and_a_plain_array_untouched() -> None:
    plain = events_body(now_utc())
    body, sent_at, problems = unwrap_envelope(plain)
    assert body is plain and sent_at is None and problems == []
    wrapped = b' \n{"sent_at": "2026-01-01T10:00:00+02:00", "events": ' + plain + b"}"
    body, sent_at, problems = unwrap_envelope(wrapped)
    assert json.loads(body) == json.loads(plain) and problems == []
    assert sent_at == datetime(2026, 1, 1, 8, tzinfo=UTC)
    for bad, field in ((b'{"events": [], "x": 1}', "x"), (b'{"sent_at": 1, "events": []}',
                       "sent_at"), (b"{}", "events")):  # fmt: skip
        _, _, problems = unwrap_envelope(bad)
        assert [p.field for p in problems] == [field]
    with pytest.raises(NotJSON):
        unwrap_envelope(b'{"events": [')


def test_the_rollups_bench_takes_the_pass_that_rolled_past_skipped_minutes(
    tmp_path: Path,
) -> None:
    """A pass longer than a minute makes the next roll to a later minute: the bench
    reports that pass and how many minutes were skipped, instead of waiting for ever."""
    minute = 1_796_548_080_000
    log = tmp_path / "rollups-0.log"
    log.write_text(
        f"... rolled 300 accounts to {label(minute + 2 * 60_000)} in 75.00 s (0 failed)\n"
        f"... rolled 200 accounts to {label(minute + 2 * 60_000)} in 12.50 s (0 failed)\n"
    )
    found = wait_for_pass(tmp_path, minute, 500, timeout=2)
    assert (found.skipped, found.seconds, found.per_process) == (2, 75.0, [(300, 75.0),
                                                                         (200, 12.5)])  # fmt: skip
    with pytest.raises(RuntimeError, match="no pass rolled 501 accounts"):
        wait_for_pass(tmp_path, minute, 501, timeout=0.5)
