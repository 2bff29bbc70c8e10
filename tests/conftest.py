"""Fixtures: real Redis and FerretDB (or REDIS_URL / MONGO_URL), the service in-process
or as real processes.

Like arq's tests, most tests build the app and the workers in-process, against
the real servers (``app``: the Sanic app served on a free port in the test's
event loop; ``Flusher`` and ``Roller`` driven directly). Tests that need real
processes (kill, restart, signals) start ``sanic`` as a subprocess
(``start_service``). Each gets its own database and stream names.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# prometheus-client reads this when core.metrics is first imported
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="events-test-metrics-"))

import httpx
import pytest
from sanic import Sanic

from core.settings import Settings, load_settings
from scripts.stack import Stack, free_port, running_stack, scratch_dir
from service.app import build_app
from service.flusher import Flusher
from tests.support import Backends, Service, service_env, unique

# the in-process apps' VAR_DIRs, for this session only
SCRATCH = tempfile.mkdtemp(prefix="events-test-session-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if metrics_dir.name.startswith("events-test-metrics-"):  # made above, not given
        shutil.rmtree(metrics_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with (
        scratch_dir("events-test-stack-") as var_dir,
        running_stack(var_dir, os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", ""))
        as started,
    ):  # fmt: skip
        yield started


def settings_for(stack: Stack, **overrides: Any) -> Settings:
    """Settings for one isolated service: its own database and stream names."""
    env = {
        "REDIS_URL": stack.redis_url,
        "MONGO_URL": stack.mongo_url,
        "MONGO_DB": unique("test"),
        "STREAM_KEY": unique("stream"),
        "VAR_DIR": tempfile.mkdtemp(prefix="var-", dir=SCRATCH),
        "FLUSH_INTERVAL_MS": "50",
        "CLAIM_IDLE_MS": "1000",
        "SHUTDOWN_GRACE_SECONDS": "3",
        "SUMMARY_CACHE_SECONDS": "0",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_settings(env)


def backends_for(settings: Settings) -> Backends:
    return Backends(
        settings.redis_url,
        settings.mongo_url,
        settings.mongo_db,
        settings.stream_key,
        settings.stream_partitions,
        rollup_partitions=settings.rollup_partitions,
    )


@dataclass
class Running:
    """The app served in-process on a free port, and the workers a test started."""

    settings: Settings
    backends: Backends
    client: httpx.AsyncClient
    server: Any
    application: Any
    workers: list[tuple[Any, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def redis(self) -> Any:
        """The app's own async Redis client."""
        return self.application.ctx.redis

    @property
    def db(self) -> Any:
        """The app's own async MongoDB database."""
        return self.application.ctx.db

    async def post(self, events: Any, **kwargs: Any) -> httpx.Response:
        return await self.client.post("/events", json=events, **kwargs)

    def start_flusher(self, slot: int = 0, **overrides: Any) -> Flusher:
        settings = self.settings
        if overrides:
            from dataclasses import replace

            settings = replace(settings, **overrides)
        flusher = Flusher(settings, slot)
        self.workers.append((flusher, asyncio.ensure_future(flusher.run())))
        return flusher

    async def stop_workers(self) -> None:
        for worker, _ in self.workers:
            worker.stopping.set()
        for _, task in self.workers:
            await asyncio.wait_for(task, 30)
        self.workers.clear()


AppFactory = Callable[..., Awaitable[Running]]


async def apps_on(stack: Stack) -> AsyncIterator[AppFactory]:
    """Apps started in-process on ``stack``, stopped (and their databases dropped) after."""
    Sanic.test_mode = True  # several apps of the same name in one process
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        settings = settings_for(stack, **overrides)
        application = build_app(settings)
        port = free_port()
        server = await application.create_server(
            host="127.0.0.1", port=port, return_asyncio_server=True
        )
        assert server is not None
        await server.startup()  # type: ignore[no-untyped-call]
        await server.before_start()  # type: ignore[no-untyped-call]
        await server.after_start()  # type: ignore[no-untyped-call]
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        running = Running(settings, backends_for(settings), client, server, application)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop_workers()
        await running.client.aclose()
        await running.server.before_stop()
        await running.server.close()
        await running.server.wait_closed()
        await running.server.after_stop()
        running.backends.mongo.drop_database(running.settings.mongo_db)
        running.backends.close()


@pytest.fixture
async def app(stack: Stack) -> AsyncIterator[AppFactory]:
    """Start the app in-process: ``running = await app(**setting_overrides)``."""
    async for factory in apps_on(stack):
        yield factory


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


ServiceFactory = Callable[..., tuple[Service, Backends]]


def _service_factory(stack: Stack, var_dir: Path) -> Iterator[ServiceFactory]:
    started: list[tuple[Service, Backends]] = []

    def start(workers: int = 1, **overrides: Any) -> tuple[Service, Backends]:
        env = service_env(stack.redis_url, stack.mongo_url, var_dir, **overrides)
        service = Service(env=env, workers=workers)
        service.start(var_dir)
        backends = Backends(
            stack.redis_url,
            stack.mongo_url,
            env["MONGO_DB"],
            env["STREAM_KEY"],
            int(env.get("STREAM_PARTITIONS", 1)),
            rollup_partitions=int(env.get("ROLLUP_PARTITIONS", 1)),
        )
        started.append((service, backends))
        return service, backends

    yield start
    for service, backends in started:
        service.stop()
        backends.close()


@pytest.fixture(scope="module")
def start_service(stack: Stack, var_dir: Path) -> Iterator[ServiceFactory]:
    yield from _service_factory(stack, var_dir)


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory) -> tuple[Service, Backends]:
    """One real service per module (1 HTTP worker, a flusher, the rollups process)."""
    return start_service()


@pytest.fixture
def own_stack() -> Iterator[Stack]:
    """Servers this test alone controls (to stop, kill and restart them)."""
    with scratch_dir("events-test-servers-") as var_dir, running_stack(var_dir) as started:
        yield started


@pytest.fixture
def start_own_service(own_stack: Stack, tmp_path: Path) -> Iterator[ServiceFactory]:
    yield from _service_factory(own_stack, tmp_path)
