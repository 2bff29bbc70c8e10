"""The Sanic application factory: routes, per-worker connections, managed processes.

    sanic service.app:create_app --factory --workers N

starts N HTTP workers plus ``FLUSHERS`` flusher processes and the ``rollups``
process through Sanic's worker manager (as ``ROLES`` says), with a watchdog
restarting any that die.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pymongo.errors import PyMongoError
from sanic import HTTPResponse, Request, Sanic
from sanic.response import BaseHTTPResponse
from sanic_ext import Extend, openapi
from sanic_ext.extensions.openapi.builders import OperationStore
from sanic_ext.extensions.openapi.extension import OpenAPIExtension
from sanic_ext.extensions.openapi.types import Integer, String

from core import store
from core.buckets import WINDOWS
from core.connections import REDIS_ERRORS, connect_redis
from core.events import batch_schema
from core.figures import MAX_TOP
from core.metrics import export_metrics_dir
from core.settings import Settings, load_settings
from core.worker import start_process
from rollups.scheduler import rollups_process
from service import admin, data_admin, errors, ops, sdk_config, sdks
from service.caches import WorkerMemory
from service.cors import Cors, Handler, add_preflight, read_route, with_cors
from service.dashboard import get_dashboard
from service.flusher import flusher_process
from service.http_metrics import RequestStats
from service.ingest import limits_from, post_events
from service.keyring import KeyRing
from service.queue import Producer
from service.quotas import Quotas
from service.stream import Hub, get_stream
from service.summary import get_summary
from service.timeseries import DEFAULT_STEPS, MAX_POINTS, STEPS, get_timeseries
from service.watchdog import Watchdog

App = Sanic[Any, Any]

APP_NAME = "events_service"


def create_app() -> App:
    """The factory Sanic's CLI calls in the main process and in each worker."""
    return build_app(load_settings())


def build_app(settings: Settings) -> App:
    export_metrics_dir(settings.metrics_dir, os.getpid())
    app = Sanic(APP_NAME)
    app.config.REQUEST_MAX_SIZE = settings.max_body_bytes
    app.config.ACCESS_LOG = False
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.shutdown_grace_seconds
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_URL_PREFIX = "/docs"
    app.ctx.settings = settings
    app.ctx.limits = limits_from(settings)
    app.ctx.cors = Cors(settings)
    app.ctx.live_metrics = [ops.rollup_figures]
    # OpenAPI only: sanic-ext's other built-ins (injection, CORS, auto OPTIONS)
    # run per request and cost ~10% of a small ingest request (py-spy)
    Extend(app, extensions=[OpenAPIExtension], built_in_extensions=False)
    app.ext.openapi.describe(
        "Event ingestion and analytics",
        version="0.2.0",
        description="Batched user-activity events in; exact per-account summaries out.",
    )
    if settings.runs("http"):
        _add_routes(app)
    _add_ops_routes(app)
    app.error_handler.add(Exception, _render_error)
    app.register_middleware(_count_answer, "response")
    _add_listeners(app, settings)
    return app


async def _count_answer(request: Request, response: BaseHTTPResponse) -> None:
    stats: RequestStats | None = getattr(request.app.ctx, "request_stats", None)
    if stats is not None:
        stats.record(request, response)


def _render_error(request: Request, exc: Exception) -> HTTPResponse:
    if getattr(exc, "status_code", None) == 413 and not isinstance(exc, errors.ApiError):
        limit = request.app.ctx.settings.max_body_bytes
        exc = errors.BodyTooLarge(f"the body may be at most {limit} bytes")
    return with_cors(request, errors.render(request, exc))


def unwrapped(documented: Handler, handler: Handler) -> Handler:
    """``handler`` itself, with the OpenAPI definition sanic-ext made for ``documented``.

    sanic-ext's ``body=`` wraps a handler in another coroutine for its validation,
    which we do not use (msgspec validates): that cost a few percent of a one-event
    request. The spec needs only the definition, which is moved back to the handler.
    """
    store = OperationStore()  # type: ignore[no-untyped-call]
    if documented is not handler and documented in store:
        store[handler] = store.pop(documented)
    return handler


def _add_routes(app: App) -> None:
    ingest = openapi.definition(
        summary="Ingest a batch of 1..1000 events (all-or-nothing)",
        description=(
            "202 means Redis holds the batch; it will be stored exactly once. After a 503 "
            "(or a timeout) the batch may or may not have been taken: send it again, "
            "which is safe, since an (account_id, event_id) pair is stored once. "
            "Timestamps may be at most MAX_FUTURE_SECONDS ahead and no older than "
            "RAW_RETENTION_DAYS; every accepted event is counted in every window covering it."
        ),
        body={"application/json": batch_schema(app.ctx.settings.max_batch_events)},
        response=[
            openapi.definitions.Response({"application/json": {"type": "object"}}, status=202),
            openapi.definitions.Response({"application/json": {"type": "object"}}, status=400),
        ],
    )(post_events)
    ingest = unwrapped(ingest, post_events)
    app.add_route(ingest, "/events", methods=["POST"], name="post_events", ctx_cors="write")
    add_preflight(app, "/events", "write", "post_events_preflight")
    sdks.add_routes(app)  # Segment/RudderStack and PostHog SDK routes, same pipeline
    sdk_config.add_routes(app)  # what browser SDKs fetch before they send
    admin.add_routes(app)
    data_admin.add_routes(app)  # dead letters, account exports
    params: list[Any] = [
        openapi.definitions.Parameter(
            "window",
            String(enum=list(WINDOWS)),  # type: ignore[no-untyped-call]
            "query",
            description="15m, 1h, 6h, 24h (default), 7d or 30d",
        ),
        openapi.definitions.Parameter(
            "top",
            Integer(minimum=1, maximum=MAX_TOP),  # type: ignore[no-untyped-call]
            "query",
            description=f"how many top users, 1..{MAX_TOP} (default 5)",
        ),
    ]
    summary = openapi.definition(
        summary="Exact per-account figures for a window ending now", parameter=params
    )(read_route(get_summary))
    app.add_route(summary, "/summary/<account_id:str>", methods=["GET"], name="summary",
                  ctx_cors="read")  # fmt: skip
    add_preflight(app, "/summary/<account_id:str>", "read", "summary_preflight")
    summary_query = openapi.definition(
        summary="The same, with account_id in the query string",
        parameter=[
            openapi.definitions.Parameter("account_id", str, "query", required=True),
            *params,
        ],
    )(read_route(get_summary))
    app.add_route(summary_query, "/summary", methods=["GET"], name="summary_query",
                  ctx_cors="read")  # fmt: skip
    add_preflight(app, "/summary", "read", "summary_query_preflight")
    steps = f"{', '.join(STEPS)}; must divide the window, at most {MAX_POINTS} steps"
    defaults = ", ".join(f"{w}: {s}" for w, s in DEFAULT_STEPS.items())
    timeseries = openapi.definition(
        summary="Exact per-account events per step (total and per type) for a window ending now",
        description=(
            "Points cover [from, to) in steps starting at `from`; the last one ends at `to`. "
            "They add up to /summary's figures for the same window and moment."
        ),
        parameter=[
            params[0],
            openapi.definitions.Parameter(
                "step",
                String(enum=list(STEPS)),  # type: ignore[no-untyped-call]
                "query",
                description=f"{steps} (default by window: {defaults})",
            ),
        ],
    )(read_route(get_timeseries))
    app.add_route(timeseries, "/timeseries/<account_id:str>", methods=["GET"], name="timeseries",
                  ctx_cors="read")  # fmt: skip
    add_preflight(app, "/timeseries/<account_id:str>", "read", "timeseries_preflight")
    stream = openapi.definition(
        summary="Server-sent events of an account's events as they are stored (read key)",
        description=(
            "event: stored, id: event_id, data: the event. ?types= and ?users= filter "
            "(comma-separated). The key may be given as ?key= (EventSource sends no headers). "
            "A client that falls behind is sent event: end and dropped."
        ),
        parameter=[
            openapi.definitions.Parameter("types", str, "query"),
            openapi.definitions.Parameter("users", str, "query"),
            openapi.definitions.Parameter("key", str, "query", description="a read key"),
        ],
    )(get_stream)
    app.add_route(stream, "/stream/<account_id:str>", methods=["GET"], name="stream",
                  ctx_cors="read")  # fmt: skip
    add_preflight(app, "/stream/<account_id:str>", "read", "stream_preflight")
    page = openapi.definition(
        summary="A live dashboard of one account (HTML; reads /summary and /timeseries)",
        response=[openapi.definitions.Response({"text/html": {"type": "string"}}, status=200)],
    )(get_dashboard)
    app.add_route(page, "/dashboard", methods=["GET"], name="dashboard")


def _add_ops_routes(app: App) -> None:
    """Every host answers these, whatever its roles."""
    app.add_route(ops.health, "/health", methods=["GET"], name="health")
    app.add_route(ops.ready, "/ready", methods=["GET"], name="ready")
    app.add_route(ops.metrics_endpoint, "/metrics", methods=["GET"], name="metrics")


def _add_listeners(app: App, settings: Settings) -> None:
    @app.before_server_start
    async def connect(app: App) -> None:
        start_process("http", settings.log_level, title="http worker")
        app.ctx.redis = connect_redis(settings.redis_url, settings.redis_cluster)
        app.ctx.producer = Producer(app.ctx.redis, settings)
        app.ctx.quotas = Quotas(settings)
        app.ctx.mongo = store.connect(settings, settings.summary_timeout_seconds)
        app.ctx.db = store.database(app.ctx.mongo, settings)
        app.ctx.read_memory = WorkerMemory.for_settings(settings, app.ctx.redis)
        app.ctx.stream_hub = Hub(settings, app.ctx.redis)
        app.ctx.request_stats = RequestStats(settings.access_log)
        app.ctx.request_stats.start()
        app.ctx.keyring = KeyRing(settings, app.ctx.db, app.ctx.redis)
        if settings.keys_required:
            with contextlib.suppress(PyMongoError, *REDIS_ERRORS):
                await app.ctx.keyring.refresh()  # ready at once when the stores are
            app.ctx.keyring.start()

    @app.before_server_stop
    async def close_connections_when_done(app: App) -> None:
        # Sanic waits for busy keep-alive connections to go idle, which a client
        # sending steadily never does: it stopped only at the graceful timeout, with a
        # traceback. Each connection now closes after its next answer.
        app.config.KEEP_ALIVE = False
        await app.ctx.stream_hub.close()  # /stream clients are told, and let go

    @app.after_server_stop
    async def disconnect(app: App) -> None:
        await app.ctx.keyring.stop()
        await app.ctx.request_stats.stop()
        await app.ctx.redis.aclose()
        await app.ctx.mongo.close()

    @app.main_process_start
    async def title_main(app: App) -> None:
        start_process("main", settings.log_level)

    @app.main_process_ready
    async def start_processes(app: App) -> None:
        kwargs: dict[str, Any] = {"settings": settings}
        if settings.runs("flusher"):
            for slot in range(settings.flushers):
                app.manager.manage(f"flusher-{slot}", flusher_process, {**kwargs, "slot": slot},
                                   restartable=True)  # fmt: skip
        if settings.runs("rollups"):
            app.manager.manage("rollups", rollups_process, kwargs, restartable=True)
        app.ctx.watchdog = Watchdog(app.manager, settings.watchdog_interval_seconds)
        app.ctx.watchdog.start()
        # the watchdog must not restart what a shutdown stops, and a shutdown must end
        app.ctx.watchdog.stop_on_signals(settings.shutdown_grace_seconds + 15)

    @app.main_process_stop
    async def stop_watchdog(app: App) -> None:
        watchdog = getattr(app.ctx, "watchdog", None)
        if watchdog:
            watchdog.stop()
