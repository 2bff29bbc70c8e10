"""The one lifecycle every background process of the service shares.

Like arq's ``Worker``: :func:`run_worker` titles the process, configures
logging, registers the signal handlers once and runs :meth:`Worker.run`,
which connects to Redis and MongoDB, calls :meth:`Worker.startup` (retried
while a server is unreachable), then :meth:`Worker.main` until SIGTERM/SIGINT
(Sanic's manager stops its processes with SIGINT), then gives ``main``
``SHUTDOWN_GRACE_SECONDS`` to finish what it is doing, and closes the
connections. The flusher and the rollups process are small specialisations.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError
from setproctitle import setproctitle

from core import metrics, store, tasks
from core.connections import REDIS_ERRORS, Redis, connect_redis
from core.lifetime import signal_on_parent_death
from core.logs import configure_logging
from core.settings import Settings
from core.store import Database, Document

log = logging.getLogger(__name__)

TITLE_PREFIX = "events-service"
STARTUP_RETRY_SECONDS = 1.0
RSS_EVERY_SECONDS = 5.0


def set_title(role: str) -> None:
    setproctitle(f"{TITLE_PREFIX}: {role}")


def start_process(role: str, log_level: str, title: str = "") -> None:
    """What every process of the service does first: its title, its logging, and a
    SIGTERM (a clean stop) when the process that started it dies."""
    set_title(title or role)
    configure_logging(role, log_level)
    signal_on_parent_death(signal.SIGTERM)


class Worker(ABC):
    """A background process: connect, start up, loop, drain, close."""

    role: ClassVar[str]

    def __init__(self, settings: Settings, mongo_timeout_seconds: float | None = None) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.redis: Redis = connect_redis(settings.redis_url, settings.redis_cluster)
        self.mongo: AsyncMongoClient[Document] = store.connect(settings, mongo_timeout_seconds)
        self.db: Database = store.database(self.mongo, settings)

    @abstractmethod
    async def startup(self) -> None:
        """Prepare (indexes, consumer groups); retried while a server is unreachable."""

    @abstractmethod
    async def main(self) -> None:
        """The work loop; return soon after ``self.stopping`` is set."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """After ``main`` ended or was given up on: release what it holds."""

    async def run(self) -> None:
        try:
            if await self._start():
                await self._main_until_stopped()
        finally:
            await self.shutdown()
            await self.close()
        log.info("%s stopped", self.role)

    async def _start(self) -> bool:
        while not self.stopping.is_set():
            try:
                await self.startup()
                return True
            except (PyMongoError, *REDIS_ERRORS) as exc:
                log.warning("start-up failed (%s); retrying", exc)
                await asyncio.sleep(STARTUP_RETRY_SECONDS)
        return False

    async def _report_memory(self) -> None:
        while True:
            metrics.report_rss(self.role)
            await asyncio.sleep(RSS_EVERY_SECONDS)

    async def _main_until_stopped(self) -> None:
        memory = asyncio.create_task(self._report_memory())
        try:
            await self._work_until_stopped()
        finally:
            await tasks.stop([memory])

    async def _work_until_stopped(self) -> None:
        work = asyncio.create_task(self.main())
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not work.done():
            done, _ = await asyncio.wait({work}, timeout=self.settings.shutdown_grace_seconds)
            if not done:
                log.warning("%s still busy after the shutdown grace; stopping it", self.role)
                await tasks.stop([work])
                return
        work.result()  # re-raise what ended it early

    async def close(self) -> None:
        await self.redis.aclose()
        await self.mongo.close()


def run_worker(role: str, build: Callable[[], Worker], settings: Settings) -> None:
    """Entry point of a managed process: title, logging, uvloop, the lifecycle."""
    import uvloop

    start_process(role, settings.log_level)

    async def run() -> None:  # built inside the loop its clients will use
        worker = build()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        await worker.run()

    uvloop.run(run())
