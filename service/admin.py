"""Admin routes for API keys: create, list, revoke, rotate (an ``admin`` key's accounts).

The same operations as ``python -m scripts.keys``, over HTTP; both call
``core/api_keys.py``. A key is shown once, in the answer that creates it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec
from sanic import HTTPResponse, Request, Sanic
from sanic_ext import openapi

from core import api_keys
from core.api_keys import ApiKey, KeyRequestError
from core.events import now_utc
from core.settings import Settings
from service.auth import require
from service.errors import BadRequest, InvalidJSON, NotFound, client_input
from service.responses import json_response

MAX_OVERLAP = timedelta(days=365)


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    scope: str
    accounts: list[str]
    label: str = ""
    expires_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    quotas: dict[str, int] = msgspec.field(default_factory=dict)


class Rotation(msgspec.Struct, forbid_unknown_fields=True):
    # how long the old key keeps working beside the new one
    old_valid_seconds: float = 86_400.0


def decoded(request: Request, kind: type[Any]) -> Any:
    body = request.body or b"{}"
    with client_input("the body"):
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"the body is not a valid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidJSON(f"the body is not valid JSON: {exc}") from None


async def _admin_over(request: Request, key_id: str) -> ApiKey:
    """The stored key, once the request's key may administer every account of it."""
    settings: Settings = request.app.ctx.settings
    try:
        target = await api_keys.get(request.app.ctx.db, key_id)
    except KeyRequestError as exc:
        require(request, settings, [], "admin")  # an unknown id is no news to a non-admin
        raise NotFound(str(exc)) from None
    require(request, settings, target.accounts, "admin")
    return target


async def list_keys(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    account = request.args.get("account")
    key = require(request, settings, [account] if account else [], "admin")
    found = await api_keys.listed(request.app.ctx.db, account)
    if key is not None:  # only the keys it may administer
        found = [k for k in found if key.covers(k.accounts)]
    now = now_utc()
    return json_response({"keys": [k.public() | {"active": k.active(now)} for k in found]})


async def create_key(request: Request) -> HTTPResponse:
    settings: Settings = request.app.ctx.settings
    wanted: NewKey = decoded(request, NewKey)
    require(request, settings, wanted.accounts, "admin")
    try:
        key, raw = await api_keys.create(request.app.ctx.db, request.app.ctx.redis, settings,
                                         wanted.scope, wanted.accounts, wanted.label,
                                         wanted.expires_at, wanted.quotas)  # fmt: skip
    except KeyRequestError as exc:
        raise BadRequest(str(exc)) from None
    return json_response({"key": raw, **key.public()}, 201)


async def revoke_key(request: Request, key_id: str) -> HTTPResponse:
    await _admin_over(request, key_id)
    settings: Settings = request.app.ctx.settings
    key = await api_keys.revoke(request.app.ctx.db, request.app.ctx.redis, settings, key_id)
    return json_response(key.public())


async def rotate_key(request: Request, key_id: str) -> HTTPResponse:
    await _admin_over(request, key_id)
    rotation: Rotation = decoded(request, Rotation)
    if not 0 <= rotation.old_valid_seconds <= MAX_OVERLAP.total_seconds():
        raise BadRequest(f"old_valid_seconds must be 0..{int(MAX_OVERLAP.total_seconds())}")
    settings: Settings = request.app.ctx.settings
    try:
        new, raw, old = await api_keys.rotate(
            request.app.ctx.db, request.app.ctx.redis, settings, key_id,
            timedelta(seconds=rotation.old_valid_seconds),
        )  # fmt: skip
    except KeyRequestError as exc:
        raise BadRequest(str(exc)) from None
    return json_response({"key": raw, **new.public(), "old": old.public()}, 201)


def add_routes(app: Sanic[Any, Any]) -> None:
    doc = openapi.definition
    app.add_route(doc(summary="List API keys (admin key)")(list_keys), "/admin/keys",
                  methods=["GET"], name="admin_list_keys")  # fmt: skip
    create = doc(
        summary="Create an API key (admin key); the key is in this answer only",
        body={"application/json": {"type": "object", "properties": {
            "scope": {"type": "string", "enum": list(api_keys.SCOPES)},
            "accounts": {"type": "array", "items": {"type": "string"}},
            "label": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time"},
            "quotas": {"type": "object", "additionalProperties": {"type": "integer"}}},
            "required": ["scope", "accounts"]}},
    )(create_key)  # fmt: skip
    app.add_route(create, "/admin/keys", methods=["POST"], name="admin_create_key")
    revoke = doc(summary="Revoke an API key now (admin key)")(revoke_key)
    app.add_route(revoke, "/admin/keys/<key_id:str>", methods=["DELETE"], name="admin_revoke_key")
    rotate = doc(
        summary="Rotate an API key: a new key, the old one valid old_valid_seconds more",
        body={"application/json": {"type": "object", "properties": {
            "old_valid_seconds": {"type": "number"}}}},
    )(rotate_key)  # fmt: skip
    app.add_route(rotate, "/admin/keys/<key_id:str>/rotate", methods=["POST"],
                  name="admin_rotate_key")  # fmt: skip
