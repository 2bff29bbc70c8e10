"""API keys: which key a request carries, and whether it may act for some accounts."""

from __future__ import annotations

from collections.abc import Iterable

from sanic import Request

from core.settings import Settings
from service.errors import Forbidden, Unauthorized

MAX_LISTED = 50


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return str(key)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip()) or None
    return None


def authenticate(request: Request, settings: Settings) -> str | None:
    """The request's key; 401 when keys are on and it has none we know."""
    key = api_key_of(request)
    if settings.api_keys and (key is None or key not in settings.api_keys):
        raise Unauthorized()
    return key


def authorize(settings: Settings, key: str | None, accounts: Iterable[str], verb: str) -> None:
    """403 unless the key may ``verb`` (read/write) every one of ``accounts``."""
    if not settings.api_keys:
        return
    denied = sorted({a for a in accounts if not settings.api_key_allows(key, a)})
    if denied:
        raise Forbidden(f"this API key may not {verb} these accounts", accounts=denied[:MAX_LISTED])
