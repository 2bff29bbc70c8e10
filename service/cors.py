"""CORS: which web pages may call which routes, answered without touching Redis.

Every route says what kind of access it gives (``ctx_cors`` on the route:
``write`` for ingestion and the SDKs' config calls, ``read`` for figures);
an answer to a request with an ``Origin`` the setting allows for that kind
carries ``Access-Control-Allow-Origin``, and a preflight (``OPTIONS``) is
answered here, from the settings alone. Nothing sends credentials (cookies)
cross-origin, so a wildcard is safe where every origin is allowed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Coroutine
from typing import Any

from sanic import HTTPResponse, Request

from core.settings import Settings
from service.errors import Forbidden

# what the SDKs send (the research note on their sources, docs in the README);
# a preflight asking for others gets them too, if they are plain header names
DEFAULT_HEADERS = ("content-type, content-encoding, authorization, x-api-key, anonymousid, "
                   "sentat, x-retry-count, rsa-recovered, rsa-retry-attempt, "
                   "rsa-since-last-attempt, rsa-since-first-attempt, rsa-retry-reason")  # fmt: skip
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
Handler = Callable[..., Coroutine[Any, Any, HTTPResponse]]
METHODS = {"write": "GET, POST, OPTIONS", "read": "GET, OPTIONS"}
EXPOSED = "Retry-After"


class Cors:
    def __init__(self, settings: Settings) -> None:
        self._origins = {"write": settings.cors_write_origins, "read": settings.cors_read_origins}
        self._max_age = str(settings.cors_max_age_seconds)

    def allowed(self, origin: str, access: str) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``, None if it is not allowed."""
        origins = self._origins.get(access, frozenset())
        if "*" in origins:
            return "*"
        return origin if origin in origins else None

    def headers(self, request: Request) -> dict[str, str] | None:
        """What an answer to this request adds for a page (None for other clients)."""
        origin = request.headers.get("origin")
        if not origin or request.route is None:
            return None
        access = getattr(request.route.ctx, "cors", None)
        allow = self.allowed(origin, access) if access else None
        if allow is None:
            return None
        return {"access-control-allow-origin": allow, "access-control-expose-headers": EXPOSED,
                "vary": "Origin"}  # fmt: skip

    def preflight(self, request: Request, access: str) -> HTTPResponse:
        origin = request.headers.get("origin", "")
        allow = self.allowed(origin, access)
        if allow is None:
            who = origin or "pages without an origin"
            raise Forbidden(f"this service does not take {access} requests from {who}")
        asked = request.headers.get("access-control-request-headers", "").strip()
        headers = asked if asked and _HEADER_LIST.fullmatch(asked) else DEFAULT_HEADERS
        return HTTPResponse(status=204, headers={
            "access-control-allow-origin": allow,
            "access-control-allow-methods": METHODS[access],
            "access-control-allow-headers": headers,
            "access-control-max-age": self._max_age,
            "vary": "Origin, Access-Control-Request-Headers",
        })  # fmt: skip


def cors_headers(request: Request) -> dict[str, str] | None:
    """The CORS headers an answer to ``request`` needs (None: not from a page)."""
    if "origin" not in request.headers:  # the usual case, and the cheapest test
        return None
    cors: Cors = request.app.ctx.cors
    return cors.headers(request)


def with_cors(request: Request, response: HTTPResponse) -> HTTPResponse:
    headers = cors_headers(request)
    if headers:
        response.headers.update(headers)
    return response


def read_route(handler: Handler) -> Handler:
    """A read handler whose answers carry the CORS headers its origin is allowed."""

    @functools.wraps(handler)
    async def answered(request: Request, **kwargs: Any) -> HTTPResponse:
        return with_cors(request, await handler(request, **kwargs))

    return answered


def add_preflight(app: Any, uri: str, access: str, name: str) -> None:
    """An OPTIONS route for ``uri`` answering preflights for ``access``."""

    async def preflight(request: Request, **_: Any) -> HTTPResponse:
        cors: Cors = request.app.ctx.cors
        return cors.preflight(request, access)

    app.add_route(preflight, uri, methods=["OPTIONS"], name=name, ctx_cors=access)
