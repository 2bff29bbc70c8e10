"""Keys as data: scopes on every route, revocation, expiry, rotation, the CLI, many
workers and hosts seeing one change, and the closed default beyond loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from core.api_keys import PREFIX
from core.settings import SettingsError, load_settings
from scripts.stack import ROOT, Stack
from tests.conftest import AppFactory, Running, ServiceFactory
from tests.support import drained, eventually, iso, make_event, unique, wait_for


def cli_env(settings: Any) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "MONGO_URL": settings.mongo_url,
        "MONGO_DB": settings.mongo_db,
    }


def keys_cli(settings: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.keys", *args],
        cwd=ROOT,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def made_key(running: Running, scope: str, *accounts: str, **extra: Any) -> str:
    """A key made over HTTP with the bootstrap admin key."""
    body = {"scope": scope, "accounts": list(accounts), **extra}
    response = await running.client.post("/admin/keys", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


BOOT = "boot-admin-secret"
ADMIN = {"x-api-key": BOOT}


@pytest.fixture
async def keyed(app: AppFactory) -> Running:
    running = await app(api_keys=f"{BOOT}=*@admin", keys_refresh_seconds=0.2)
    running.start_flusher()
    return running


def segment_body(n: int) -> dict[str, Any]:
    return {
        "batch": [
            {
                "type": "track",
                "event": "Signed Up",
                "messageId": f"m{n}",
                "userId": "u1",
                "timestamp": iso(datetime.now(UTC)),
            }
        ]
    }


async def status_of_each_route(
    running: Running, key: str | None, account: str, n: int
) -> dict[str, int]:
    c = running.client
    headers = {"x-api-key": key} if key else {}
    basic = {"authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    ph = {
        "api_key": key,
        "batch": [
            {
                "event": "$pageview",
                "distinct_id": "u1",
                "uuid": f"00000000-0000-4000-8000-{n:012d}",
                "timestamp": iso(datetime.now(UTC)),
            }
        ],
    }
    return {
        "events": (
            await c.post("/events", json=[make_event(account, n)], headers=headers)
        ).status_code,
        "segment": (
            await c.post("/v1/batch", json=segment_body(n), headers=basic if key else {})
        ).status_code,
        "posthog": (await c.post("/batch/", json=ph)).status_code,
        "summary": (await c.get(f"/summary/{account}", headers=headers)).status_code,
        "summary_query": (
            await c.get("/summary", params={"account_id": account}, headers=headers)
        ).status_code,
        "timeseries": (await c.get(f"/timeseries/{account}", headers=headers)).status_code,
        "admin_list": (await c.get("/admin/keys", headers=headers)).status_code,
        "admin_create": (
            await c.post(
                "/admin/keys", headers=headers, json={"scope": "read", "accounts": [account]}
            )
        ).status_code,
    }


async def test_each_scope_on_every_route(keyed: Running) -> None:
    account, other = unique("acc"), unique("other")
    write = await made_key(keyed, "write", account)
    read = await made_key(keyed, "read", account)
    admin = await made_key(keyed, "admin", account)
    foreign = await made_key(keyed, "admin", other)
    await eventually(lambda: keyed.application.ctx.keyring.find(foreign), what="keys loaded")
    ok_write = {"events": 202, "segment": 200, "posthog": 200}
    ok_read = {"summary": 200, "summary_query": 200, "timeseries": 200}
    ok_admin = {"admin_list": 200, "admin_create": 201}
    expected = {
        "write": {**ok_write, **dict.fromkeys([*ok_read, *ok_admin], 403)},
        "read": {**dict.fromkeys([*ok_write, *ok_admin], 403), **ok_read},
        "admin": {**ok_write, **ok_read, **ok_admin},
        # an SDK's write key names its own account (the other one); /events names this
        "foreign": {
            "events": 403,
            "segment": 200,
            "posthog": 200,
            "admin_create": 403,
            **dict.fromkeys(ok_read, 403),
            "admin_list": 200,
        },
        "none": dict.fromkeys([*ok_write, *ok_read, *ok_admin], 401),
        "unknown": dict.fromkeys([*ok_write, *ok_read, *ok_admin], 401),
    }
    keys = {
        "write": write,
        "read": read,
        "admin": admin,
        "foreign": foreign,
        "none": None,
        "unknown": "evk_000000000000_not-a-key",
    }
    for n, (name, key) in enumerate(keys.items()):
        got = await status_of_each_route(keyed, key, account, n)
        assert got == expected[name], name
    # a write key reading: the 403 says what the key may do
    denied = await keyed.client.get(f"/summary/{account}", headers={"x-api-key": write})
    assert denied.json()["scope"] == "write" and "read" in denied.json()["message"]
    # operations routes stay open
    for path in ("/health", "/metrics"):
        assert (await keyed.client.get(path)).status_code == 200
    # every accepted event of the write and admin keys was stored
    await eventually(drained(keyed.backends, account, 6), what="6 accepted events")


async def test_revoked_and_expired_keys_stop_within_two_seconds(keyed: Running) -> None:
    account = unique("acc")
    key = await made_key(keyed, "write", account)
    soon = datetime.now(UTC) + timedelta(seconds=2)
    expiring = await made_key(keyed, "write", account, expires_at=iso(soon))

    async def post(k: str, n: int) -> int:
        response = await keyed.post([make_event(account, n)], headers={"x-api-key": k})
        return response.status_code

    await eventually(lambda: keyed.application.ctx.keyring.find(expiring), what="keys loaded")
    assert await post(key, 1) == 202 and await post(expiring, 2) == 202
    listed = (
        await keyed.client.get("/admin/keys", params={"account": account}, headers=ADMIN)
    ).json()["keys"]
    key_id = next(k["id"] for k in listed if k["expires_at"] is None)
    revoked = await keyed.client.delete(f"/admin/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    asked = time.monotonic()
    n = 10
    while await post(key, n) == 202:
        n += 1
        assert time.monotonic() - asked < 2, "a revoked key still wrote after 2 s"
        await asyncio.sleep(0.05)
    assert await post(key, n + 1) == 401
    while datetime.now(UTC) < soon:
        await asyncio.sleep(0.05)
    expired = await keyed.post([make_event(account, 99)], headers={"x-api-key": expiring})
    assert expired.status_code == 401 and "expired or was revoked" in expired.json()["message"]
    # unknown ids are a 404 to an admin
    assert (await keyed.client.delete("/admin/keys/nope", headers=ADMIN)).status_code == 404


async def test_rotation_keeps_the_old_key_for_the_overlap(keyed: Running) -> None:
    account = unique("acc")
    old = await made_key(keyed, "write", account, label="web")
    old_id = old.split("_")[1]
    rotated = await keyed.client.post(
        f"/admin/keys/{old_id}/rotate", headers=ADMIN, json={"old_valid_seconds": 2}
    )
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["key"]
    assert rotated.json()["label"] == "web" and rotated.json()["old"]["revoked_at"]
    await eventually(lambda: keyed.application.ctx.keyring.find(new), what="new key loaded")

    async def post(k: str, n: int) -> int:
        response = await keyed.post([make_event(account, n)], headers={"x-api-key": k})
        return response.status_code

    assert await post(old, 1) == 202 and await post(new, 2) == 202  # the overlap
    until = datetime.fromisoformat(rotated.json()["old"]["revoked_at"].replace("Z", "+00:00"))
    while datetime.now(UTC) < until:
        await asyncio.sleep(0.05)
    assert await post(old, 3) == 401
    assert await post(new, 4) == 202
    await eventually(drained(keyed.backends, account, 3))


async def test_the_cli_creates_lists_rotates_and_revokes(keyed: Running) -> None:
    account = unique("acc")
    made = await asyncio.to_thread(
        keys_cli,
        keyed.settings,
        "create",
        "--scope",
        "read",
        "--account",
        account,
        "--label",
        "grafana",
        "--expires-in",
        "30d",
    )
    assert made.returncode == 0, made.stderr
    raw = made.stdout.strip()
    assert raw.startswith("evk_") and "shown only now" in made.stderr
    listed = await asyncio.to_thread(
        keys_cli, keyed.settings, "list", "--account", account, "--json"
    )
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["scope"], r["label"], r["active"]) for r in rows] == [("read", "grafana", True)]
    assert raw not in listed.stdout
    # stored hashed: the key itself is nowhere in its document
    doc = keyed.backends.db["api_keys"].find_one({"_id": rows[0]["id"]})
    assert doc is not None and raw not in json.dumps(doc, default=str)
    await eventually(lambda: keyed.application.ctx.keyring.find(raw), what="CLI key loaded")
    reading = await keyed.client.get(f"/summary/{account}", headers={"x-api-key": raw})
    assert reading.status_code == 200
    rotated = await asyncio.to_thread(
        keys_cli, keyed.settings, "rotate", rows[0]["id"], "--old-valid-for", "0s"
    )
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    revoked = await asyncio.to_thread(keys_cli, keyed.settings, "revoke", rows[0]["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout

    async def swapped() -> bool:
        old_status = await keyed.client.get(f"/summary/{account}", headers={"x-api-key": raw})
        new_status = await keyed.client.get(f"/summary/{account}", headers={"x-api-key": new})
        return old_status.status_code == 401 and new_status.status_code == 200

    await eventually(swapped, 2, what="the old key refused, the new one taken")
    bad = await asyncio.to_thread(
        keys_cli, keyed.settings, "create", "--scope", "write", "--account", "not an account"
    )
    assert bad.returncode == 2 and "not account ids" in bad.stderr
    gone = await asyncio.to_thread(keys_cli, keyed.settings, "revoke", "nope")
    assert gone.returncode == 2 and "no key" in gone.stderr


async def test_raw_keys_never_name_a_redis_key(app: AppFactory) -> None:
    running = await app(api_keys=f"{BOOT}=*@admin", rate_limit_events_per_second=1000)
    account = unique("acc")
    key = await made_key(running, "write", account)
    await eventually(lambda: running.application.ctx.keyring.find(key), what="key loaded")
    for raw in (key, BOOT):
        response = await running.post([make_event(account, 1)], headers={"x-api-key": raw})
        assert response.status_code == 202
    names = [k.decode() for k in running.backends.redis.scan_iter(count=1000)]
    assert any(":rate:" in name for name in names), "the rate limit ran"
    secret = key.removeprefix(PREFIX).split("_", 1)[1]  # (a secret may hold "_" itself)
    assert not [n for n in names if key in n or BOOT in n or secret in n]


def test_keys_are_required_beyond_loopback_unless_said_otherwise() -> None:
    with pytest.raises(SettingsError, match="AUTH=open"):
        load_settings({"HOST": "0.0.0.0"})
    assert load_settings({"HOST": "0.0.0.0", "AUTH": "open"}).keys_required is False
    assert load_settings({"HOST": "0.0.0.0", "AUTH": "keys"}).keys_required is True
    assert load_settings({"HOST": "10.1.2.3", "API_KEYS": "k=*@admin"}).keys_required
    assert load_settings({"HOST": "127.0.0.1"}).keys_required is False
    assert load_settings({"HOST": "::1"}).keys_required is False
    with pytest.raises(SettingsError, match="contradict"):
        load_settings({"AUTH": "open", "API_KEYS": "k=*"})
    with pytest.raises(SettingsError, match="scopes"):
        load_settings({"API_KEYS": "k=*@root"})
    # the real start-up refuses too, before it serves anything
    refused = subprocess.run(
        [sys.executable, "-m", "scripts.serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HOST": "0.0.0.0", "API_KEYS": "", "AUTH": ""},
        timeout=60,
    )
    assert refused.returncode == 2 and "AUTH=open" in refused.stderr


def test_a_revocation_reaches_every_worker_of_every_host_within_two_seconds(
    stack: Stack, start_service: ServiceFactory
) -> None:
    account = unique("acc")
    common = {"api_keys": f"{BOOT}=*@admin", "mongo_db": unique("keys")}
    host_a, backends = start_service(workers=2, **common)
    host_b, _ = start_service(workers=2, stream_key=host_a.env["STREAM_KEY"], **common)
    made = httpx.post(
        f"{host_a.url}/admin/keys", headers=ADMIN, json={"scope": "write", "accounts": [account]}
    )
    assert made.status_code == 201
    key, key_id = made.json()["key"], made.json()["id"]
    hosts = [host_a.url, host_b.url]
    outcomes: list[tuple[float, str, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        n = 0
        while not stop.is_set():
            for url in hosts:  # a new connection each: the kernel spreads them over workers
                n += 1
                response = httpx.post(
                    f"{url}/events",
                    json=[make_event(account, n)],
                    headers={"x-api-key": key, "connection": "close"},
                )
                outcomes.append((time.monotonic(), url, response.status_code))

    def all_accept() -> bool:
        recent = outcomes[-8:]
        return len(recent) == 8 and all(status == 202 for _, _, status in recent)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        wait_for(all_accept, 20, what="both hosts taking the new key")
        revoked = subprocess.run(
            [sys.executable, "-m", "scripts.keys", "revoke", key_id],
            cwd=ROOT,
            env=cli_env(backends.settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert revoked.returncode == 0, revoked.stderr
        revoked_at = time.monotonic()
        wait_for(lambda: time.monotonic() > revoked_at + 4, 10, what="4 s of traffic")
    finally:
        stop.set()
        thread.join(30)
    late = [(url, status) for at, url, status in outcomes if at > revoked_at + 2]
    assert len(late) >= 10 and {status for _, status in late} == {401}, late[:10]
    assert {url for url, _ in late} == set(hosts)
    # what was accepted before is stored; and the key appears in no log
    accepted = sum(1 for at, _, status in outcomes if status == 202)
    wait_for(drained(backends, account, accepted), 60, what="accepted events stored")
    for host in (host_a, host_b):
        assert key not in host.log_tail(10**7)
