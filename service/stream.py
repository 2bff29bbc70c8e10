"""GET /stream/{account}: server-sent events of the account's events as they are stored.

A debugger view for integrators ("did my page's events arrive?"): each event
the flusher newly stores for the account is one SSE message (``event: stored``,
``id``: its event_id, ``data``: the event as POST /events takes it), filtered
by ``?types=`` and ``?users=`` (comma-separated). It needs a ``read`` key (in
``X-API-Key``, or ``?key=``, since a browser's EventSource sends no headers).

Each HTTP worker has one Redis subscription for all its clients (``Hub``);
each client has a bounded buffer (``STREAM_BUFFER_FLUSHES`` flushes' worth of its
events). A client that falls further behind is dropped (its connection closed):
nothing waits for it, so it never slows ingest or other clients. When the server
stops, each client is sent ``event: end`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from sanic import Request
from sanic.response import HTTPResponse

from core import keys, metrics, tasks
from core.connections import REDIS_ERRORS, Redis
from core.settings import Settings
from service.auth import api_key_of, authorize, known_key
from service.cors import cors_headers
from service.errors import BadRequest, Unavailable
from service.live_events import POLL_SECONDS, RENEW_SECONDS, mark_watched
from service.query import check_account

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
MAX_FILTER = 100
_encode = msgspec.json.Encoder().encode


@dataclass(eq=False)
class Watcher:
    account: str
    types: frozenset[str]
    users: frozenset[str]
    queue: asyncio.Queue[list[dict[str, Any]] | None]
    ended: str = ""  # why this client is being let go
    drop: Callable[[], None] | None = None  # closes its connection at once

    def offer(self, events: list[dict[str, Any]]) -> None:
        wanted = [e for e in events if (not self.types or e["type"] in self.types)
                  and (not self.users or e["user_id"] in self.users)]  # fmt: skip
        if not wanted or self.ended:
            return
        try:
            self.queue.put_nowait(wanted)
        except asyncio.QueueFull:
            # its handler is stuck sending (the client reads nothing): nothing more can
            # reach it, so its connection is closed; an EventSource reconnects by itself
            self.ended = "fell behind"
            metrics.STREAM_CLIENTS_DROPPED.inc()
            log.info("a /stream client of %s fell behind by %d flushes; dropped",
                     self.account, self.queue.maxsize)  # fmt: skip
            if self.drop:
                try:
                    self.drop()
                except Exception:  # already closing: the handler ends anyway
                    log.debug("closing a dropped /stream client failed", exc_info=True)

    def end(self, reason: str) -> None:
        """Let the client go, after what is already in its buffer."""
        if self.ended:
            return
        self.ended = reason
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(None)


@dataclass
class Hub:
    """One worker's subscription to the watched accounts' channels, fanned out."""

    settings: Settings
    redis: Redis
    watchers: dict[str, set[Watcher]] = field(default_factory=dict)
    _pubsub: Any = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _changing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def count(self) -> int:
        return sum(len(w) for w in self.watchers.values())

    async def join(self, watcher: Watcher) -> None:
        # one (un)subscription at a time: the connection is shared, and made by the first
        async with self._changing:
            if self._pubsub is None:
                await self._start()
            if watcher.account not in self.watchers:
                await self._pubsub.subscribe(keys.stream_channel(self.settings, watcher.account))
            self.watchers.setdefault(watcher.account, set()).add(watcher)
        await mark_watched(self.redis, self.settings, [watcher.account])

    async def leave(self, watcher: Watcher) -> None:
        async with self._changing:
            group = self.watchers.get(watcher.account)
            if group is None:
                return
            group.discard(watcher)
            if not group:
                del self.watchers[watcher.account]
                channel = keys.stream_channel(self.settings, watcher.account)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._pubsub.unsubscribe(channel)

    async def _start(self) -> None:
        # a plain connection (on a Redis Cluster, to the node REDIS_URL names: a
        # PUBLISH reaches every node's subscribers)
        client = aioredis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        prefix = keys.stream_channel(self.settings, "")
        await pubsub.subscribe(f"{prefix}-")  # a channel nobody uses: connects now
        self._pubsub = pubsub
        self._tasks = [asyncio.ensure_future(self._listen(prefix)),
                       asyncio.ensure_future(self._renew())]  # fmt: skip

    async def _listen(self, prefix: str) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=HEARTBEAT_SECONDS)
            except REDIS_ERRORS as exc:
                log.warning("the /stream subscription failed (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            if not message or message.get("type") != "message":
                continue
            account = message["channel"].decode()[len(prefix) :]
            try:
                events = msgspec.json.decode(message["data"])
            except msgspec.DecodeError:
                continue
            for watcher in list(self.watchers.get(account, ())):
                watcher.offer(events)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            with contextlib.suppress(*REDIS_ERRORS):
                await mark_watched(self.redis, self.settings, list(self.watchers))

    async def close(self) -> None:
        for group in self.watchers.values():
            for watcher in group:
                watcher.end("the server is stopping; reconnect")
        await tasks.stop(self._tasks)
        if self._pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._pubsub.aclose()


def _filter(request: Request, name: str) -> frozenset[str]:
    raw = request.args.get(name, "")
    values = frozenset(v for v in raw.split(",") if v) if raw else frozenset()
    if len(values) > MAX_FILTER:
        raise BadRequest(f"{name} may list at most {MAX_FILTER} values", field=name)
    return values


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: ".encode() + _encode(data) + b"\n\n"


async def get_stream(request: Request, account_id: str) -> HTTPResponse | None:
    settings: Settings = request.app.ctx.settings
    account = check_account(account_id)
    if settings.keys_required:
        key = known_key(request, settings, api_key_of(request) or request.args.get("key"),
                        "send a read key in X-API-Key or ?key=")  # fmt: skip
        authorize(key, [account], "read")
    hub: Hub = request.app.ctx.stream_hub
    if hub.count() >= settings.stream_max_clients:
        raise Unavailable("too many /stream clients on this worker; retry later",
                          settings.retry_after_seconds)  # fmt: skip
    watcher = Watcher(account, _filter(request, "types"), _filter(request, "users"),
                      asyncio.Queue(settings.stream_buffer_flushes))  # fmt: skip
    transport = request.transport
    watcher.drop = transport.abort if hasattr(transport, "abort") else None
    try:
        await hub.join(watcher)
    except REDIS_ERRORS as exc:
        raise Unavailable("the event stream is unreachable; retry later",
                          settings.retry_after_seconds) from exc  # fmt: skip
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no",
               **(cors_headers(request) or {})}  # fmt: skip
    response = await request.respond(content_type="text/event-stream", headers=headers)
    try:
        # "ready" once every flusher has seen the new watcher: what is stored from then on
        # is shown
        await asyncio.sleep(2 * POLL_SECONDS)
        await response.send(b"retry: 2000\n" + sse("ready", {"account_id": account}))
        while True:
            try:
                events = await asyncio.wait_for(watcher.queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.send(b": keep-alive\n\n")
                continue
            if events is None:
                await response.send(sse("end", {"reason": watcher.ended}))
                break
            await response.send(b"".join(sse("stored", e, e.get("event_id")) for e in events))
    finally:
        await hub.leave(watcher)
        with contextlib.suppress(Exception):
            await response.eof()
    return None
