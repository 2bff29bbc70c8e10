"""The Sanic application factory: routes, per-worker connections, managed processes.

    sanic service.app:create_app --factory --workers N

starts N HTTP workers plus the ``flusher`` (and, when present, ``rollups``)
process through Sanic's worker manager, with a watchdog restarting any that die.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic_ext import Extend, openapi
from sanic_ext.extensions.openapi.extension import OpenAPIExtension

from service import ops, queue, store
from service.config import Settings, export_metrics_dir, load_settings
from service.events import batch_schema
from service.ingest import limits_from, post_events
from service.processes import Watchdog, configure_logging, set_title
from service.responses import error_response
from service.summary import SingleFlight, get_summary, rollup_figures

log = logging.getLogger("service.app")

App = Sanic[Any, Any]

APP_NAME = "events_service"

ERROR_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}


def create_app() -> App:
    """The factory Sanic's CLI calls in the main process and in each worker."""
    return build_app(load_settings())


def build_app(settings: Settings) -> App:
    export_metrics_dir(settings, os.getpid())
    app = Sanic(APP_NAME)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    app.config.ACCESS_LOG = False
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_URL_PREFIX = "/docs"
    app.ctx.settings = settings
    app.ctx.limits = limits_from(settings)
    app.ctx.live_metrics = []
    # OpenAPI only: sanic-ext's other built-ins (injection, CORS, auto OPTIONS)
    # run per request and cost ~10% of a small ingest request (py-spy)
    Extend(app, extensions=[OpenAPIExtension], built_in_extensions=False)
    app.ext.openapi.describe(
        "Event ingestion and analytics",
        version="0.1.0",
        description="Batched user-activity events in; exact per-account summaries out.",
    )
    _add_routes(app)
    _add_error_handler(app)
    _add_listeners(app, settings)
    return app


def _add_routes(app: App) -> None:
    ingest = openapi.definition(
        summary="Ingest a batch of 1..1000 events (all-or-nothing)",
        body={"application/json": batch_schema(app.ctx.settings.max_batch_events)},
        response=[
            openapi.definitions.Response({"application/json": {"type": "object"}}, status=202),
            openapi.definitions.Response({"application/json": {"type": "object"}}, status=400),
        ],
    )(post_events)
    app.add_route(ingest, "/events", methods=["POST"], name="post_events")
    summary = openapi.definition(
        summary="Exact per-account figures for a window ending now",
        parameter=[
            openapi.definitions.Parameter(
                "window", str, "query", description="15m, 1h, 6h, 24h (default), 7d or 30d"
            ),
            openapi.definitions.Parameter(
                "top", int, "query", description="how many top users, 1..100 (default 5)"
            ),
        ],
    )(get_summary)
    app.add_route(summary, "/summary/<account_id:str>", methods=["GET"], name="summary")
    app.add_route(summary, "/summary", methods=["GET"], name="summary_query")
    app.ctx.live_metrics.append(rollup_figures)
    app.add_route(ops.health, "/health", methods=["GET"], name="health")
    app.add_route(ops.ready, "/ready", methods=["GET"], name="ready")
    app.add_route(ops.metrics_endpoint, "/metrics", methods=["GET"], name="metrics")


def _add_error_handler(app: App) -> None:
    async def on_error(request: Request, exc: Exception) -> Any:
        if isinstance(exc, SanicException):
            status = exc.status_code
            name = ERROR_NAMES.get(status, "error" if status < 500 else "internal_error")
            if status == 413:
                message = f"the body may be at most {app.ctx.settings.max_body_bytes} bytes"
            else:
                message = str(exc) or name.replace("_", " ")
            return error_response(status, name, message, headers=getattr(exc, "headers", None))
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "an unexpected error occurred")

    app.error_handler.add(Exception, on_error)


def _add_listeners(app: App, settings: Settings) -> None:
    @app.before_server_start
    async def connect(app: App) -> None:
        set_title("http worker")
        configure_logging()
        app.ctx.redis = queue.connect(settings.redis_url)
        app.ctx.producer = queue.Producer(app.ctx.redis, settings)
        app.ctx.mongo = store.connect(settings, settings.summary_timeout_seconds)
        app.ctx.db = store.database(app.ctx.mongo, settings)
        app.ctx.summaries_in_flight = SingleFlight()

    @app.after_server_stop
    async def disconnect(app: App) -> None:
        await app.ctx.redis.aclose()
        await app.ctx.mongo.close()

    @app.main_process_start
    async def title_main(app: App) -> None:
        set_title("main")

    @app.main_process_ready
    async def start_processes(app: App) -> None:
        from rollups.scheduler import rollups_process
        from service.flusher import flusher_process

        kwargs = {"settings": settings}
        if settings.run_flusher:
            app.manager.manage("flusher", flusher_process, kwargs, restartable=True)
        if settings.run_rollups:
            app.manager.manage("rollups", rollups_process, kwargs, restartable=True)
        app.ctx.watchdog = Watchdog(app.manager, settings.watchdog_interval_seconds)
        app.ctx.watchdog.start()

    @app.main_process_stop
    async def stop_watchdog(app: App) -> None:
        watchdog = getattr(app.ctx, "watchdog", None)
        if watchdog:
            watchdog.stop()
