"""API keys on requests: which key a request carries, and whether it may do what it asks.

With ``AUTH=open`` nothing is checked (the key is ``None``). With ``AUTH=keys``
every data route needs a key the worker's :class:`~service.keyring.KeyRing`
knows, active (not expired or revoked), with the permission the route needs
(``write``, ``read`` or ``admin``) for every account the request names.
"""

from __future__ import annotations

from collections.abc import Iterable

from sanic import Request

from core.api_keys import ALL_ACCOUNTS, ApiKey
from core.events import now_utc
from core.settings import Settings
from service.errors import Forbidden, Unauthorized, Unavailable
from service.keyring import KeyRing

MAX_LISTED = 50
MISSING = "send a valid API key in X-API-Key or Authorization: Bearer"
# what each permission lets a key do, for the 403 that names what is missing
VERBS = {"write": "add events", "read": "read figures", "admin": "administer"}


def api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return str(key)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip()) or None
    return None


def authenticate(request: Request, settings: Settings) -> ApiKey | None:
    """The request's key (``X-API-Key`` or a Bearer token); None when keys are off."""
    if not settings.keys_required:
        return None
    return known_key(request, settings, api_key_of(request), MISSING)


def known_key(request: Request, settings: Settings, raw: str | None, missing: str) -> ApiKey:
    """The key ``raw`` names, if it is known and active; 401 otherwise."""
    if not raw:
        raise Unauthorized(missing)
    ring: KeyRing = request.app.ctx.keyring
    key = ring.find(raw)
    if key is None:
        if not ring.loaded:  # the store was unreachable since this worker started
            raise Unavailable("API keys cannot be checked yet; retry later",
                              settings.retry_after_seconds)  # fmt: skip
        raise Unauthorized("unknown API key")
    if not key.active(now_utc()):
        raise Unauthorized(f"API key {key.id} has expired or was revoked")
    return key


def authorize(key: ApiKey | None, accounts: Iterable[str], permission: str) -> None:
    """403 unless ``key`` may ``permission`` (write, read, admin) every one of ``accounts``."""
    if key is None:
        return
    if permission not in key.permissions:
        raise Forbidden(
            f"a {key.scope} key may not {VERBS[permission]}: use a {permission} key",
            scope=key.scope,
        )
    if ALL_ACCOUNTS in key.accounts:
        return
    denied = sorted({a for a in accounts if a not in key.accounts})
    if denied:
        raise Forbidden(f"this API key may not {VERBS[permission]} for these accounts",
                        accounts=denied[:MAX_LISTED])  # fmt: skip


def require(
    request: Request, settings: Settings, accounts: Iterable[str], permission: str
) -> ApiKey | None:
    """Authenticate, then authorize: the key, once it may do this."""
    key = authenticate(request, settings)
    authorize(key, accounts, permission)
    return key
