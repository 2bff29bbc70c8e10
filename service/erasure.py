"""Erasure over HTTP (an ``admin`` key of the account): a user, a time range, a whole account.

    DELETE /accounts/acc_1/users/{user_id}                  a user's events
    DELETE /accounts/acc_1/events?from=…&to=…               events with timestamp in [from, to)
    DELETE /accounts/acc_1                                  everything of the account
    GET    /accounts/acc_1/erasures[/{job_id}]              where erasures stand

Each DELETE runs the erasure (``rollups/erasure.py``) in the background of the
worker that took it and waits for it up to ``?wait=`` seconds
(``ERASURE_WAIT_SECONDS`` by default): 200 with the finished job, or 202 with the
job as it stands and a ``Location`` to follow it. Asking again for the same scope
joins the run in progress in that worker, resumes an unfinished one (after a
crash, or a 503), or, once it finished, runs it again (erasing what came since,
if anything). 400 for a bad account, user, range or ``wait``; 503 with
``Retry-After`` when it cannot go on now (the rollups lease busy, the queue not
draining, a store unreachable): it resumes where it stopped when asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import unquote

import msgspec
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core import erasure, store, tasks
from core.api_keys import ApiKey
from core.connections import REDIS_ERRORS
from core.erasure import ErasureError, ErasureRefused, Job, Scope
from core.events import is_account_id
from core.settings import Settings
from core.store import Database, Document
from core.tail import redis_time_ms
from rollups.erasure import Eraser
from service.auth import require
from service.dead_letters import who
from service.errors import BadRequest, NotFound, Unavailable, client_input
from service.responses import json_response

log = logging.getLogger(__name__)

MAX_WAIT = 300
_Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
_encode = msgspec.json.Encoder().encode


class Erasures:
    """One HTTP worker's erasures in progress (one task per job), and their store client
    (with the rollups' time budget: an erasure's reads and deletes are not summaries')."""

    def __init__(self, app: Sanic[Any, Any]) -> None:
        settings: Settings = app.ctx.settings
        self.settings = settings
        self.redis = app.ctx.redis
        self.mongo: AsyncMongoClient[Document] = store.connect(
            settings, settings.rollup_timeout_seconds
        )
        self.db: Database = store.database(self.mongo, settings)
        self.running: dict[str, asyncio.Task[Job]] = {}

    def start(self, scope: Scope, by: str) -> asyncio.Task[Job]:
        task = self.running.get(scope.job_id)
        if task is None or task.done():
            eraser = Eraser(self.db, self.redis, self.settings, by)
            task = asyncio.ensure_future(eraser.erase(scope))
            task.add_done_callback(self._finished)
            self.running[scope.job_id] = task
        return task

    def _finished(self, task: asyncio.Task[Job]) -> None:
        for job_id, running in list(self.running.items()):
            if running is task:
                del self.running[job_id]
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: the asker (if still there) saw it too
        if exc is not None and not isinstance(exc, ErasureError | ErasureRefused):
            log.warning("an erasure failed: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        await tasks.stop(self.running.values())
        await self.mongo.close()


def erasures_of(app: Sanic[Any, Any]) -> Erasures:
    found: Erasures | None = getattr(app.ctx, "erasures", None)
    if found is None:
        found = app.ctx.erasures = Erasures(app)
    return found


@contextlib.contextmanager
def answered(settings: Settings) -> Iterator[None]:
    """What the erasure said, as an answer: 400 when it cannot be asked so, 503 (with
    Retry-After; asking again resumes it) when it cannot go on now."""
    retry = settings.retry_after_seconds
    try:
        yield
    except ErasureRefused as exc:
        raise BadRequest(str(exc)) from None
    except ErasureError as exc:
        raise Unavailable(str(exc), retry) from None
    except PyMongoError as exc:
        raise Unavailable("MongoDB is unreachable; ask again to resume", retry) from exc
    except REDIS_ERRORS as exc:
        raise Unavailable("Redis is unreachable; ask again to resume", retry) from exc


def _account(account: str) -> str:
    if not is_account_id(account):
        raise BadRequest("the account must be 1..64 characters of A-Z a-z 0-9 _ . : -")
    return account


def _wait(request: Request, settings: Settings) -> float:
    text = request.args.get("wait")
    if text is None:
        return settings.erasure_wait_seconds
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and int(text) <= MAX_WAIT):
        raise BadRequest(f"wait must be a whole number of seconds from 0 to {MAX_WAIT}",
                         field="wait")  # fmt: skip
    return float(text)


def _time(request: Request, name: str) -> datetime:
    text = request.args.get(name)
    if not text:
        raise BadRequest(f"{name} is required: an RFC 3339 time with a zone, e.g. "
                         "2026-11-26T09:00:00Z", field=name)  # fmt: skip
    try:
        return msgspec.json.decode(_encode(text), type=_Timestamp).astimezone(UTC)
    except (msgspec.ValidationError, OverflowError):
        message = f"{name} must be an RFC 3339 time with a zone, e.g. 2026-11-26T09:00:00Z"
        raise BadRequest(f"{message} (got {text[:100]!r})", field=name) from None


async def _erase(request: Request, account: str, make: Callable[[], Scope]) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    key: ApiKey | None = require(request, settings, [_account(account)], "admin")
    with client_input("the request"):
        wait = _wait(request, settings)
        try:
            scope = make()
        except ErasureRefused as exc:
            raise BadRequest(str(exc)) from None
    runner = erasures_of(request.app)
    with answered(settings):
        scope.check(settings, redis_time_ms(await runner.redis.time()))
        task = runner.start(scope, who(key))
        try:
            job = await asyncio.wait_for(asyncio.shield(task), timeout=wait)
        except TimeoutError:
            found = await erasure.find_job(runner.db, scope.job_id)
            if found is not None and found.state == erasure.DONE:
                found = None  # the previous run's record: this one has not begun yet
            location = f"/accounts/{scope.account}/erasures/{scope.job_id}"
            return json_response({"erasure": _status(scope.job_id, scope.public(), found)},
                                 202, {"Location": location})  # fmt: skip
        dropped = await erasure.dropped_so_far(runner.db, runner.redis, settings, job.run_id)
    return json_response({"erasure": job.public(dropped)})


async def erase_user(request: Request, account: str, user_id: str) -> HTTPResponse:
    # the route gives the segment as sent: percent-escapes are the client's (a "/" in a
    # user id is sent as %2F), and bytes that are not UTF-8 are a 400
    return await _erase(request, account, lambda: Scope.of_user(account, _unquoted(user_id)))


def _unquoted(segment: str) -> str:
    return unquote(segment, errors="strict")


async def erase_range(request: Request, account: str) -> HTTPResponse:
    def scope() -> Scope:
        return Scope.of_range(account, _time(request, "from"), _time(request, "to"))

    return await _erase(request, account, scope)


async def erase_account(request: Request, account: str) -> HTTPResponse:
    return await _erase(request, account, lambda: Scope.of_account(account))


async def list_erasures(request: Request, account: str) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    require(request, settings, [_account(account)], "admin")
    runner = erasures_of(request.app)
    with answered(settings):
        found = await erasure.jobs(runner.db, account)
    return json_response({"erasures": [job.public() for job in found]})


async def show_erasure(request: Request, account: str, job_id: str) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    require(request, settings, [_account(account)], "admin")
    runner = erasures_of(request.app)
    with answered(settings):
        job = await erasure.find_job(runner.db, job_id)
        task = runner.running.get(job_id)
        begun = job is not None and job.state != erasure.DONE
        if task is not None and not task.done() and not begun:  # asked for, not begun yet
            return json_response({"erasure": _status(job_id, {"account": account}, None)})
        if job is None or job.account != account:
            raise NotFound(f"no erasure {job_id[:100]!r} of account {account}")
        dropped = await erasure.dropped_so_far(runner.db, runner.redis, settings, job.run_id)
    return json_response({"erasure": job.public(dropped)})


def _status(job_id: str, scope: dict[str, Any], job: Job | None) -> dict[str, Any]:
    """Where a job stands; one asked for but not begun yet (waiting for the lease) has no
    record yet, or only the record of its previous run."""
    if job is None:
        return {"id": job_id, **{k: erasure.iso(v) for k, v in scope.items()},
                "state": "starting"}  # fmt: skip
    return job.public()


def add_routes(app: Sanic[Any, Any]) -> None:
    Param = openapi.definitions.Parameter
    wait = Param("wait", int, "query", description=f"seconds to wait, 0..{MAX_WAIT} (then 202)")
    answers = (
        "200: done (the job, with how many events it erased); 202: still running (follow "
        "Location); 503 with Retry-After: it cannot go on now (ask again: it resumes)."
    )
    user = openapi.definition(
        summary="Erase a user's events and every figure derived from them (admin key)",
        description="Raw events, rollups, live tail, caches; queued events of the user are "
        "never stored. " + answers,
        parameter=[wait],
    )(erase_user)
    app.add_route(user, "/accounts/<account:str>/users/<user_id:str>", methods=["DELETE"],
                  name="erase_user")  # fmt: skip
    events = openapi.definition(
        summary="Erase an account's events with a timestamp in [from, to) (admin key)",
        description="Before the raw retention, from and to must be whole hours. " + answers,
        parameter=[
            Param("from", str, "query", required=True, description="RFC 3339, inclusive"),
            Param("to", str, "query", required=True, description="RFC 3339, exclusive"),
            wait,
        ],
    )(erase_range)
    app.add_route(events, "/accounts/<account:str>/events", methods=["DELETE"],
                  name="erase_range")  # fmt: skip
    account = openapi.definition(
        summary="Erase a whole account: every raw event, rollup document, tail (admin key)",
        description=answers,
        parameter=[wait],
    )(erase_account)
    app.add_route(account, "/accounts/<account:str>", methods=["DELETE"], name="erase_account")
    listing = openapi.definition(summary="An account's erasures, newest first (admin key)")(
        list_erasures
    )
    app.add_route(listing, "/accounts/<account:str>/erasures", methods=["GET"],
                  name="erasures_list")  # fmt: skip
    show = openapi.definition(summary="One erasure: where it stands (admin key)")(show_erasure)
    app.add_route(show, "/accounts/<account:str>/erasures/<job_id:str>", methods=["GET"],
                  name="erasures_show")  # fmt: skip

    @app.after_server_stop
    async def close_erasures(app: Sanic[Any, Any]) -> None:
        found: Erasures | None = getattr(app.ctx, "erasures", None)
        if found is not None:
            await found.close()
