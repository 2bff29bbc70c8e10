"""GET /accounts/{account}/export: an account's raw events as NDJSON, streamed.

    GET /accounts/acc_1/export?from=2026-11-20T00:00:00Z&to=2026-11-27T00:00:00Z[&cursor=…]
        [&limit=N] [&gzip=1]        (an admin key of the account)

The answer is one event per line (the fields POST /events takes, see
``core/export.py``), read and sent a batch at a time, so a worker's memory
does not grow with the export. **It always ends with a trailer line**, which
names no event (no ``event_id``): ``{"export":"complete","events":n}``, or
``{"export":"partial","events":n,"cursor":"…","reason":"…"}`` when it stopped
early (``limit`` or ``EXPORT_MAX_EVENTS`` reached, or the store failed midway):
the same request with ``cursor=`` that value goes on with the next event. An
answer without a trailer was cut: resume from its last line's cursor.

Gzip: ``Accept-Encoding: gzip`` gives ``Content-Encoding: gzip`` (clients
decode it transparently); ``?gzip=1`` gives the ``.ndjson.gz`` file itself
(``application/gzip``), to save as it is.

Why an ``admin`` key: an export hands out every raw event, user ids and
metadata included, which a ``read`` key (dashboards, reports: figures) never sees.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from pymongo.errors import PyMongoError
from sanic import Request, Sanic
from sanic_ext import openapi

from core import export
from core.events import is_account_id
from core.export import Cursor, ExportError
from core.settings import Settings
from service.auth import require
from service.errors import BadRequest, Unavailable, client_input

CHUNK_BYTES = 64 * 1024
_Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
_encode = msgspec.json.Encoder().encode


def _time(request: Request, name: str) -> datetime:
    text = request.args.get(name)
    if not text:
        raise BadRequest(f"{name} is required: an RFC 3339 time with a zone, e.g. "
                         "2026-11-26T09:00:00Z")  # fmt: skip
    try:
        # in UTC: a year-1 time with a positive offset cannot be, and is a 400 here
        return msgspec.json.decode(_encode(text), type=_Timestamp).astimezone(UTC)
    except (msgspec.ValidationError, OverflowError):
        raise BadRequest(f"{name} must be an RFC 3339 time with a zone, e.g. "
                         f"2026-11-26T09:00:00Z (got {text[:100]!r})") from None  # fmt: skip


def _limit(request: Request, settings: Settings) -> int:
    text = request.args.get("limit")
    top = settings.export_max_events
    if text is None:
        return top
    if not (text.isascii() and text.isdigit() and len(text) <= 12) or not 1 <= int(text) <= top:
        raise BadRequest(f"limit must be 1..{top} (EXPORT_MAX_EVENTS)")
    return int(text)


def _gzip(request: Request) -> str:
    """How to compress: "file" (?gzip=1), "encoding" (Accept-Encoding: gzip) or "" (none)."""
    flag = request.args.get("gzip")
    if flag is not None:
        if flag not in ("0", "1", "true", "false"):
            raise BadRequest("gzip must be 1 or 0 (true or false)")
        if flag in ("1", "true"):
            return "file"
    for item in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip") and params.replace(" ", "") != "q=0":
            return "encoding"
    return ""


def trailer(events: int, cursor: Cursor | None = None, reason: str = "") -> bytes:
    if not reason:
        return _encode({"export": "complete", "events": events}) + b"\n"
    facts = {"export": "partial", "events": events,
             "cursor": str(cursor) if cursor else None, "reason": reason}  # fmt: skip
    return _encode(facts) + b"\n"


async def get_export(request: Request, account: str) -> None:
    settings: Settings = request.app.ctx.settings
    if not is_account_id(account):
        raise BadRequest("the account must be 1..64 characters of A-Z a-z 0-9 _ . : -")
    require(request, settings, [account], "admin")
    with client_input("the query"):
        start, end = _time(request, "from"), _time(request, "to")
        cursor_text = request.args.get("cursor")
        try:
            after = Cursor.parse(cursor_text) if cursor_text else None
            export.check_range(start, end, after)
        except ExportError as exc:
            raise BadRequest(str(exc)) from None
        limit = _limit(request, settings)
        mode = _gzip(request)
    lines = export.events(request.app.ctx.db, settings, account, start, end, after)
    async with aclosing(lines):
        try:
            first = await anext(lines, None)  # the store answers before the 200 is sent
        except PyMongoError as exc:
            raise Unavailable("MongoDB is unreachable; retry later",
                              settings.retry_after_seconds) from exc  # fmt: skip
        await _send(request, account, mode, first, lines, limit, after)


async def _send(
    request: Request,
    account: str,
    mode: str,
    first: tuple[bytes, Cursor] | None,
    lines: AsyncGenerator[tuple[bytes, Cursor], None],
    limit: int,
    cursor: Cursor | None,
) -> None:
    headers = {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
    content_type = "application/x-ndjson"
    if mode == "file":
        content_type = "application/gzip"
        headers["Content-Disposition"] = f'attachment; filename="{account}-export.ndjson.gz"'
    elif mode == "encoding":
        headers["Content-Encoding"] = "gzip"
    response = await request.respond(content_type=content_type, headers=headers)
    packer = zlib.compressobj(6, zlib.DEFLATED, 31) if mode else None

    async def send(data: bytes, last: bool = False) -> None:
        if packer is not None:
            flush = zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
            data = packer.compress(data) + packer.flush(flush)
        if data:
            await response.send(data)

    count, chunk, size = 0, [], 0
    item = first
    end = trailer(0)
    try:
        while item is not None:
            if count == limit:
                end = trailer(count, cursor, f"limit of {limit} events reached")
                break
            text, cursor = item
            chunk.append(text)
            size += len(text)
            count += 1
            if size >= CHUNK_BYTES:
                await send(b"".join(chunk))
                chunk, size = [], 0
            item = await anext(lines, None)
        else:
            end = trailer(count)
    except PyMongoError as exc:
        end = trailer(count, cursor, f"the store failed ({type(exc).__name__}); resume later")
    await send(b"".join(chunk) + end, last=True)
    await response.eof()


def add_routes(app: Sanic[Any, Any]) -> None:
    Param = openapi.definitions.Parameter
    route = openapi.definition(
        summary="Export an account's raw events as NDJSON, streamed (admin key)",
        description=(
            "One event per line, with the fields POST /events takes, in (hour, event_id) "
            'order; the last line is a trailer: {"export":"complete","events":n} or '
            '{"export":"partial","events":n,"cursor":…,"reason":…} (go on with '
            "cursor=). Accept-Encoding: gzip compresses the answer; gzip=1 sends a .gz file."
        ),
        parameter=[
            Param("from", str, "query", required=True, description="RFC 3339, inclusive"),
            Param("to", str, "query", required=True, description="RFC 3339, exclusive"),
            Param("cursor", str, "query", description="where a partial export stopped"),
            Param("limit", int, "query", description="events in this answer at most"),
            Param("gzip", str, "query", description="1: the answer is a gzip file"),
        ],
        response=[openapi.definitions.Response({"application/x-ndjson": {"type": "string"}})],
    )(get_export)
    app.add_route(route, "/accounts/<account:str>/export", methods=["GET"], name="export")
