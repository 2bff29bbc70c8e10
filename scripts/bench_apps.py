"""The framework ceiling for ``make bench``: a bare Sanic app that answers 202.

Same server, same worker count, same load generator and bodies as the real
service, but the handler never looks at the body: whatever the service does on
top (validate, enqueue, wait for Redis) shows up as the gap to this ceiling.

    sanic scripts.bench_apps:create_bare_app --factory --workers N
"""

from __future__ import annotations

from typing import Any

from sanic import HTTPResponse, Request, Sanic

ACCEPTED = b'{"status":"queued","count":0}'


def create_bare_app() -> Sanic[Any, Any]:
    app: Sanic[Any, Any] = Sanic("bare_ceiling")
    app.config.REQUEST_MAX_SIZE = 8 * 1024 * 1024
    app.config.ACCESS_LOG = False

    async def accept(_request: Request) -> HTTPResponse:
        return HTTPResponse(ACCEPTED, status=202, content_type="application/json")

    async def health(_request: Request) -> HTTPResponse:
        return HTTPResponse(b'{"status":"ok"}', content_type="application/json")

    app.add_route(accept, "/events", methods=["POST"])
    app.add_route(health, "/health", methods=["GET"])
    return app
