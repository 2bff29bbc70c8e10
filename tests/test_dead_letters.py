"""Dead letters you can replay (issue 19, part 4), against the real servers.

End to end: the store really refuses one event (a trigger on FerretDB's
PostgreSQL table raises for it), its batch is dead-lettered with its reason,
attempts and failure times, the cause is fixed, ``python -m
scripts.dead_letters replay`` queues it again, and every event is stored once
and counted once — the two stored before it failed included — with every
window of /summary equal to the raw events. Then the admin routes: who sees
which dead letters, paging, show, replay, a drop with its audit record, and
every bad request a 4xx.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from core import keys
from core.dead_letters import MAX_REASON
from core.events import storage_id
from scripts.stack import FERRETDB_DATABASE, Stack
from service.queue import Consumer, Failure, Retirement
from tests.conftest import AppFactory, ServiceFactory
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import Backends, eventually, make_event, unique, wait_for

WINDOWS = ("15m", "1h", "6h", "24h", "7d", "30d")
ALL, ONE, READ = "k-dl-all", "k-dl-one", "k-dl-read"


def psql(stack: Stack, sql: str) -> str:
    assert stack.postgres is not None
    done = subprocess.run(
        ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(stack.postgres.port), "-U", "postgres", "-d", FERRETDB_DATABASE, "-c", sql],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr)
    return done.stdout.strip()


def events_table(stack: Stack, database: str) -> str | None:
    """FerretDB's PostgreSQL table of a database's events collection (a schema per database)."""
    try:
        metadata = f'"{database}"._ferretdb_database_metadata'
        found = psql(stack, f"SELECT _jsonb->>'table' FROM {metadata} "
                            f"WHERE _jsonb->>'_id' = '{keys.EVENTS}'")  # fmt: skip
    except RuntimeError:  # the schema is not there yet
        return None
    return found or None


def metric(service_url: str, name: str) -> float:
    text = httpx.get(f"{service_url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    servers = {k: env[k] for k in ("REDIS_URL", "MONGO_URL", "MONGO_DB", "STREAM_KEY")}
    return subprocess.run([sys.executable, "-m", "scripts.dead_letters", *args],
                          env={**os.environ, **servers}, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def summaries_exact(url: str, backends: Backends, account: str, total: int) -> Callable[[], bool]:
    def check() -> bool:
        for window in WINDOWS:
            answer = httpx.get(f"{url}/summary/{account}", params={"window": window, "top": 100})
            got = answer.json()
            truth = ground_truth(backends.events, account, parse_iso(got["from"]),
                                 parse_iso(got["to"]), 100)  # fmt: skip
            if figures(got) != truth or got["total"] != total:
                return False
        return True

    return check


def test_a_poisoned_batch_is_dead_lettered_then_replayed_and_stored_exactly_once(
    own_stack: Stack, start_own_service: ServiceFactory
) -> None:
    if os.environ.get("MONGO_URL") or own_stack.postgres is None:
        pytest.skip("needs the embedded FerretDB on PostgreSQL (a trigger makes it refuse)")
    service, backends = start_own_service(dead_letter_after=3, claim_idle_ms=500)
    database = service.env["MONGO_DB"]
    table = wait_for(lambda: events_table(own_stack, database), 30, what="the events table")
    schema = f'"{database}"'
    psql(own_stack, f"""
        CREATE FUNCTION {schema}.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW._jsonb -> 'metadata' ? 'poison' THEN
            RAISE EXCEPTION 'this event is poisoned';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON {schema}."{table}"
          FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_poison();
    """)  # fmt: skip

    account = unique("poison")
    before = [make_event(account, n, user=f"u{n % 3}") for n in range(5)]
    # two events go in before the poisoned one stops the write; two after it never do
    poisoned = [make_event(account, 10 + n, user="u_p", type_="login") for n in range(5)]
    poisoned[2]["metadata"] = {"poison": True}
    after = [make_event(account, 20 + n, user=f"u{n % 2}", type_="custom") for n in range(5)]
    started = time.time()
    for batch in (before, poisoned, after):
        assert service.post(batch).status_code == 202
    wait_for(lambda: backends.dead_letters(), 60, what="the poisoned batch dead-lettered")
    wait_for(lambda: backends.queue_depth() == 0, 30, what="everything else stored")
    assert metric(service.url, "dead_lettered_batches_total") == 1
    assert metric(service.url, 'dead_letter_entries{partition="0"}') == 1
    stored_ids = {d["event_id"] for d in backends.stored(account)}
    assert stored_ids == {e["event_id"] for e in before + after + poisoned[:2]}
    # what it stored before failing counts already: every window is exact meanwhile
    wait_for(summaries_exact(service.url, backends, account, 12), 30, what="exact summaries")

    listed = cli(service.env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert letter["events"] == 5 and letter["accounts"] == [account]
    assert letter["attempts"] == 3 and letter["stored_before"] == 2
    assert "this event is poisoned" in letter["reason"]
    first, last = parse_iso(letter["first_failure"]), parse_iso(letter["last_failure"])
    assert started - 1 < first.timestamp() < last.timestamp() < time.time()
    assert first < last <= parse_iso(letter["dead_lettered_at"])
    plain = cli(service.env, "list")
    assert plain.returncode == 0 and plain.stdout.startswith(f"{letter['id']}  5 events")
    assert "attempts 3" in plain.stdout and "stored before 2" in plain.stdout
    shown = cli(service.env, "show", letter["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["batch"] == poisoned

    psql(own_stack, f'DROP TRIGGER refuse_poison ON {schema}."{table}"')  # the cause, fixed
    replayed = cli(service.env, "replay", letter["id"], "--reason", "trigger removed")
    assert replayed.returncode == 0, replayed.stderr
    assert backends.dead_letters() == []
    wait_for(lambda: backends.count(account) == 15 and backends.queue_depth() == 0, 30,
             what="the replayed batch stored")  # fmt: skip
    ids = [d["_id"] for d in backends.stored(account)]
    assert sorted(ids) == sorted(storage_id(account, e["event_id"])
                                 for e in before + poisoned + after)  # fmt: skip
    wait_for(summaries_exact(service.url, backends, account, 15), 30, what="exact summaries")
    assert metric(service.url, "dead_lettered_batches_total") == 1
    [record] = list(backends.db[keys.DEAD_LETTER_AUDIT].find())
    assert record["action"] == "replay" and record["done"] is True
    assert record["by"] == f"cli:uid={os.getuid()}" and record["reason"] == "trigger removed"
    assert record["events"] == 5 and record["dead_letter"] == letter["id"]
    again = cli(service.env, "replay", letter["id"])
    assert again.returncode == 2 and "no dead letter" in again.stderr
    audit = cli(service.env, "audit")
    assert audit.returncode == 0 and f"replay  {letter['id']}  5" in audit.stdout
    refused = cli(service.env, "drop", letter["id"])  # no reason
    assert refused.returncode == 2 and "--reason" in refused.stderr


async def dead_letter(running: Any, consumer: Consumer, reason: str, accounts: str) -> None:
    """Dead-letter the next queued entry as the flusher would, by the same retire script."""
    [entry] = await consumer.read_new(1, None)
    now = int(time.time() * 1000)
    failure = Failure(4, now - 60_000, now, accounts)
    assert await consumer.retire([Retirement(entry, {}, reason, failure)]) == [True]


async def test_admin_routes_list_show_replay_and_drop_with_a_record(app: AppFactory) -> None:
    a, b = unique("dla"), unique("dlb")
    running = await app(api_keys=f"{ALL}=*@admin,{ONE}={a}@admin,{READ}={a}@read")
    part = keys.partitions(running.settings)[0]
    consumer = Consumer(running.redis, part, "test-consumer", running.settings)
    await consumer.ensure_group()
    batch_a = [make_event(a, n, user=f"person_{n}@example.com") for n in range(3)]
    batch_b = [make_event(b, n, user=f"u{n}") for n in range(2)]
    for batch, reason in ((batch_a, "MongoDB refused the write: a"),
                          (batch_b, "MongoDB refused the write: b")):  # fmt: skip
        assert (await running.post(batch, headers={"X-API-Key": ALL})).status_code == 202
        await dead_letter(running, consumer, reason, batch[0]["account_id"])
    running.backends.redis.xadd(part.stream, {"count": 1, "body": b"not json"})
    running.backends.redis.incrby(part.depth, 1)
    [entry] = await consumer.read_new(1, None)
    assert await consumer.retire([Retirement(entry, dead_reason="undecodable entry")]) == [True]

    def get(path: str, key: str | None = ALL, **params: Any) -> Any:
        headers = {"X-API-Key": key} if key else {}
        return running.client.get(path, params=params, headers=headers)

    def post(path: str, body: Any, key: str | None = ALL) -> Any:
        headers = {"X-API-Key": key} if key else {}
        return running.client.post(path, content=json.dumps(body), headers=headers)

    everything = (await get("/admin/dead-letters")).json()
    assert everything["total"] == 3 and everything["next"] is None
    letters = everything["dead_letters"]
    assert [d["accounts"] for d in letters] == [[a], [b], ["*"]]
    assert [d["events"] for d in letters] == [3, 2, 1]
    assert letters[0]["attempts"] == 4 and letters[2]["attempts"] == 1
    assert "batch" not in letters[0] and "body" not in letters[0]
    # paging, one at a time
    seen, after = [], None
    while True:
        page = await get("/admin/dead-letters", limit=1, **({"after": after} if after else {}))
        seen += [d["id"] for d in page.json()["dead_letters"]]
        after = page.json()["next"]
        if after is None:
            break
    assert seen == [d["id"] for d in letters]
    # a key of account a sees a's only; filters; other scopes and no key
    mine = (await get("/admin/dead-letters", ONE)).json()
    assert [d["id"] for d in mine["dead_letters"]] == [letters[0]["id"]]
    assert mine["total"] is None, "the count of every account's dead letters is not its to see"
    only_b = (await get("/admin/dead-letters", account=b)).json()["dead_letters"]
    assert [d["id"] for d in only_b] == [letters[1]["id"]]
    assert (await get("/admin/dead-letters", ONE, account=b)).status_code == 403
    assert (await get("/admin/dead-letters", READ)).status_code == 403
    assert (await get("/admin/dead-letters", None)).status_code == 401

    first = letters[0]["id"]
    shown = (await get(f"/admin/dead-letters/{first}", ONE)).json()
    assert shown["batch"] == batch_a and shown["reason"] == "MongoDB refused the write: a"
    assert parse_iso(shown["first_failure"]) < parse_iso(shown["last_failure"])
    undecodable = (await get(f"/admin/dead-letters/{letters[2]['id']}")).json()
    assert undecodable["batch"] is None and undecodable["body"] == "not json"
    for path, key, status in [
        (f"/admin/dead-letters/{letters[1]['id']}", ONE, 403),
        (f"/admin/dead-letters/{letters[2]['id']}", ONE, 403),
        (f"/admin/dead-letters/{first}", READ, 403),
        ("/admin/dead-letters/nonsense", ALL, 400),
        ("/admin/dead-letters/0:1-0", ALL, 404),
        ("/admin/dead-letters/7:1-0", ALL, 404),
        ("/admin/dead-letters/nonsense", READ, 403),
    ]:
        assert (await get(path, key)).status_code == status, (path, key)
    for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"limit": "9" * 5000},
                   {"after": "zz"}, {"account": "a b"}):  # fmt: skip
        assert (await get("/admin/dead-letters", **params)).status_code == 400, params

    # drop: a reason is required, recorded with who, when and how many, and no event data
    drop = f"/admin/dead-letters/{first}/drop"
    for body in ({}, {"reason": ""}, {"reason": " "}, {"reason": "x" * (MAX_REASON + 1)},
                 {"reason": "ok", "extra": 1}, ["reason"]):  # fmt: skip
        answer = await post(drop, body, ONE)
        assert answer.status_code == 400, body
    bad_json = await running.client.post(drop, content=b"{", headers={"X-API-Key": ONE})
    assert bad_json.status_code == 400 and bad_json.json()["error"] == "invalid_json"
    assert (await post(drop, {"reason": "test data"}, READ)).status_code == 403
    answer = await post(drop, {"reason": "test data sent by mistake"}, ONE)
    assert answer.status_code == 200 and answer.json() == {"dropped": first, "events": 3}
    assert (await get(f"/admin/dead-letters/{first}")).status_code == 404
    assert (await post(drop, {"reason": "again"}, ONE)).status_code == 404
    [record] = list(running.backends.db[keys.DEAD_LETTER_AUDIT].find())
    assert record["action"] == "drop" and record["done"] is True
    assert record["by"].startswith("key:") and ONE not in record["by"]
    assert record["reason"] == "test data sent by mistake" and record["events"] == 3
    assert record["accounts"] == [a] and record["attempts"] == 4
    assert datetime.now(UTC) - timedelta(minutes=1) < record["at"] <= datetime.now(UTC)
    assert "person_" not in repr(record), "an audit record holds no personal data"

    # replay: the undecodable one is refused, b's goes back into the stream
    undecodable_replay = await post(f"/admin/dead-letters/{letters[2]['id']}/replay", {})
    assert undecodable_replay.status_code == 400
    replay_b = f"/admin/dead-letters/{letters[1]['id']}/replay"
    assert (await post(replay_b, {}, ONE)).status_code == 403
    answer = await post(replay_b, {"reason": "fixed"})
    assert answer.status_code == 200 and answer.json()["events"] == 2
    assert running.backends.queue_depth() == 2
    running.start_flusher()
    await eventually(lambda: running.backends.count(b) == 2 and running.backends.queue_depth() == 0,
                     what="the replayed batch stored")  # fmt: skip
    summary = (await running.client.get(f"/summary/{b}", headers={"X-API-Key": ALL})).json()
    assert summary["total"] == 2
    left = (await get("/admin/dead-letters")).json()
    assert [d["id"] for d in left["dead_letters"]] == [letters[2]["id"]]
