"""Admin routes for dead letters: list, show, replay, drop (``core/dead_letters.py``).

An ``admin`` key sees and acts on the dead letters whose accounts (those named
in the batch) are all its own; one whose body cannot be decoded names no
account, so only a key for every account (``*``) may touch it. The same
operations as ``python -m scripts.dead_letters``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from pymongo.errors import PyMongoError
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core import dead_letters
from core.api_keys import ALL_ACCOUNTS, ApiKey
from core.connections import REDIS_ERRORS
from core.dead_letters import DeadLetter, DeadLetterError
from core.events import is_account_id
from core.settings import Settings
from service.auth import require
from service.errors import BadRequest, InvalidJSON, NotFound, Unavailable, client_input
from service.responses import json_response


class DropRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: str


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = ""


def who(key: ApiKey | None) -> str:
    """The actor an audit record names: the key's id (never the key), or ``open``."""
    return f"key:{key.id}" if key is not None else "open (AUTH=open, no key)"


@contextmanager
def answered(settings: Settings) -> Iterator[None]:
    """Store failures as a 503 with Retry-After, refusals as 400/404."""
    try:
        yield
    except dead_letters.NotFound as exc:
        raise NotFound(str(exc)) from None
    except DeadLetterError as exc:
        raise BadRequest(str(exc)) from None
    except PyMongoError as exc:
        raise Unavailable("MongoDB is unreachable; retry later",
                          settings.retry_after_seconds) from exc  # fmt: skip
    except REDIS_ERRORS as exc:
        raise Unavailable("Redis is unreachable; retry later",
                          settings.retry_after_seconds) from exc  # fmt: skip


def body_of(request: Request, kind: type[Any]) -> Any:
    with client_input("the body"):
        try:
            return msgspec.json.decode(request.body or b"{}", type=kind)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"the body is not a valid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidJSON(f"the body is not valid JSON: {exc}") from None


def _limit(request: Request) -> int:
    text = request.args.get("limit", "20")
    if not (text.isascii() and text.isdigit() and len(text) <= 3):
        raise BadRequest(f"limit must be 1..{dead_letters.MAX_PAGE}")
    return int(text)


async def _letter(request: Request, dead_id: str) -> tuple[DeadLetter, ApiKey | None]:
    """The dead letter, once the request's key may administer all its accounts."""
    settings: Settings = request.app.ctx.settings
    try:
        with answered(settings):
            letter = await dead_letters.get(request.app.ctx.redis, settings, dead_id)
    except (NotFound, BadRequest):
        require(request, settings, [], "admin")  # no news about ids to a non-admin
        raise
    return letter, require(request, settings, letter.accounts, "admin")


async def list_dead_letters(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    account = request.args.get("account")
    if account is not None and not is_account_id(account):
        raise BadRequest("account must be 1..64 characters of A-Z a-z 0-9 _ . : -")
    key = require(request, settings, [account] if account else [], "admin")
    limit = _limit(request)
    with answered(settings):
        found, after = await dead_letters.page(
            request.app.ctx.redis, settings, after=request.args.get("after"), limit=limit,
            account=account, allowed=lambda accounts: key is None or key.covers(accounts),
        )  # fmt: skip
        # how many there are in all, only to a key that may see them all
        every = key is None or key.covers([ALL_ACCOUNTS])
        total = await dead_letters.count(request.app.ctx.redis, settings) if every else None
    return json_response({"dead_letters": [d.public() for d in found], "next": after,
                          "total": total})  # fmt: skip


async def show_dead_letter(request: Request, dead_id: str) -> HTTPResponse:
    letter, _ = await _letter(request, dead_id)
    return json_response(letter.shown())


async def replay_dead_letter(request: Request, dead_id: str) -> HTTPResponse:
    letter, key = await _letter(request, dead_id)
    wanted: ReplayRequest = body_of(request, ReplayRequest)
    settings: Settings = request.app.ctx.settings
    with answered(settings):
        entry = await dead_letters.replay(request.app.ctx.db, request.app.ctx.redis, settings,
                                          letter, who(key), wanted.reason)  # fmt: skip
    return json_response({"replayed": letter.id, "events": letter.count, "entry": entry})


async def drop_dead_letter(request: Request, dead_id: str) -> HTTPResponse:
    letter, key = await _letter(request, dead_id)
    wanted: DropRequest = body_of(request, DropRequest)
    settings: Settings = request.app.ctx.settings
    with answered(settings):
        await dead_letters.drop(request.app.ctx.db, request.app.ctx.redis, settings, letter,
                                who(key), wanted.reason)  # fmt: skip
    return json_response({"dropped": letter.id, "events": letter.count})


def add_routes(app: Sanic[Any, Any]) -> None:
    doc = openapi.definition
    Param = openapi.definitions.Parameter
    listing = doc(
        summary="List dead letters, oldest first (admin key: those of its accounts)",
        parameter=[
            Param("account", str, "query", description="only those with this account's events"),
            Param("limit", int, "query", description=f"1..{dead_letters.MAX_PAGE} (default 20)"),
            Param("after", str, "query", description="the `next` of the previous page"),
        ],
    )(list_dead_letters)
    app.add_route(listing, "/admin/dead-letters", methods=["GET"], name="dead_letters_list")
    show = doc(summary="One dead letter: its events, reason, attempts, failure times")(
        show_dead_letter
    )
    app.add_route(show, "/admin/dead-letters/<dead_id:str>", methods=["GET"],
                  name="dead_letters_show")  # fmt: skip
    replay = doc(
        summary="Queue a dead letter again (stored exactly once, even if partly stored before)",
        body={"application/json": {"type": "object", "properties": {
            "reason": {"type": "string", "maxLength": dead_letters.MAX_REASON}}}},
    )(replay_dead_letter)  # fmt: skip
    app.add_route(replay, "/admin/dead-letters/<dead_id:str>/replay", methods=["POST"],
                  name="dead_letters_replay")  # fmt: skip
    drop = doc(
        summary="Drop a dead letter for good; the reason is recorded (who, when, how many)",
        body={"application/json": {"type": "object", "properties": {
            "reason": {"type": "string", "minLength": 1,
                       "maxLength": dead_letters.MAX_REASON}}, "required": ["reason"]}},
    )(drop_dead_letter)  # fmt: skip
    app.add_route(drop, "/admin/dead-letters/<dead_id:str>/drop", methods=["POST"],
                  name="dead_letters_drop")  # fmt: skip
