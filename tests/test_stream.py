"""GET /stream/{account}: stored events as server-sent events, filtered, keyed, and a slow
client dropped without slowing anything else."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from core import tasks
from tests.conftest import AppFactory, Running
from tests.support import drained, eventually, make_event, unique


@asynccontextmanager
async def following(
    running: Running, account: str, **params: str
) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """(event, data) of every message the stream sends, read in the background; entered
    once the stream said it is ready."""
    got: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        async with running.client.stream("GET", f"/stream/{account}", params=params,
                                         timeout=None) as response:  # fmt: skip
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    got.append((event, json.loads(line[6:])))

    task = asyncio.ensure_future(read())
    try:
        await eventually(lambda: any(e == "ready" for e, _ in got) or task.done(), 10,
                         what="the stream to be ready")  # fmt: skip
        if task.done():
            task.result()
        yield got
    finally:
        await tasks.stop([task])


def stored_ids(got: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [data["event_id"] for event, data in got if event == "stored"]


async def test_stored_events_arrive_once_each_filtered(app: AppFactory) -> None:
    running = await app()
    running.start_flusher()
    account = unique("live")
    async with (
        following(running, account) as everything,
        following(running, account, types="login,signup", users="u1") as filtered,
    ):
        events = [make_event(account, n, user=f"u{n % 3}", type_=("login", "page_view")[n % 2],
                             metadata={"n": n}) for n in range(60)]  # fmt: skip
        for i in range(0, 60, 7):
            assert (await running.post(events[i : i + 7])).status_code == 202
        # re-sent: stored once, so shown once
        assert (await running.post(events[:10])).status_code == 202
        await eventually(drained(running.backends, account, 60))
        await eventually(lambda: len(stored_ids(everything)) >= 60, what="60 on the stream")
        wanted = sorted(e["event_id"] for e in events
                        if e["type"] == "login" and e["user_id"] == "u1")  # fmt: skip
        await eventually(lambda: len(stored_ids(filtered)) >= len(wanted), what="filtered")
        await asyncio.sleep(0)  # nothing else is owed; what came must be exactly this
    assert sorted(stored_ids(everything)) == sorted(e["event_id"] for e in events)
    assert sorted(stored_ids(filtered)) == wanted
    first = next(d for e, d in everything if e == "stored" and d["event_id"] == "e3")
    assert first == {**events[3], "timestamp": first["timestamp"]}  # as POST /events takes it


async def test_the_stream_needs_a_read_key(app: AppFactory) -> None:
    running = await app(api_keys="boot=*@admin,writer=acc_w@write,reader=acc_w@read")
    client = running.client
    assert (await client.get("/stream/acc_w")).status_code == 401
    assert (await client.get("/stream/acc_w", headers={"x-api-key": "writer"})).status_code == 403
    assert (await client.get("/stream/acc_w", params={"key": "writer"})).status_code == 403
    assert (await client.get("/stream/bad account!")).status_code == 400
    assert (
        await client.get(
            "/stream/acc_w",
            params={"types": ",".join(f"t{i}" for i in range(101))},
            headers={"x-api-key": "reader"},
        )
    ).status_code == 400
    async with following(running, "acc_w", key="reader") as got:
        assert got[0] == ("ready", {"account_id": "acc_w"})


async def test_a_slow_client_is_dropped_and_slows_nothing(app: AppFactory) -> None:
    running = await app(stream_buffer_flushes=16, flush_batch_size=20)
    running.start_flusher()
    account = unique("slow")
    dropped_before = metric_value("stream_clients_dropped_total")
    host, port = running.client.base_url.host, running.client.base_url.port
    # a client that asks and then never reads: its socket buffers fill, then its queue
    slow = socket.create_connection((host, port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(f"GET /stream/{account} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        async with following(running, account) as fast:
            hub = running.application.ctx.stream_hub
            await eventually(lambda: hub.count() == 2, 10, what="both clients following")
            total = 0
            for batch in range(60):
                events = [make_event(account, batch * 20 + i, metadata={"p": "x" * 7000})
                          for i in range(20)]  # fmt: skip
                assert (await running.post(events)).status_code == 202
                total += 20
            # everything is stored and shown, once each, to the reader that keeps up
            await eventually(drained(running.backends, account, total), 60)
            await eventually(lambda: len(stored_ids(fast)) >= total, 60, what="all shown")
            assert sorted(stored_ids(fast)) == sorted(f"e{n}" for n in range(total))
            # the other one was let go (its connection closed: what the kernel still
            # holds for it trickles out at the pace it reads)
            await eventually(lambda: hub.count() == 1, 10, what="the slow client let go")
            assert metric_value("stream_clients_dropped_total") == dropped_before + 1
    finally:
        slow.close()


def metric_value(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0
