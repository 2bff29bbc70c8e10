"""The watchdog: restarts any process of the service that died.

Sanic 25.12 does not restart a process that dies (a SIGKILLed HTTP worker or
managed process stays dead while the main process runs on), so the main
process runs this thread, which asks Sanic's worker manager to restart any
process found dead, logs it and counts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from core import metrics

log = logging.getLogger(__name__)


class Watchdog(threading.Thread):
    """Restarts dead processes through the manager's own monitor channel.

    Messages go through ``monitor_publisher`` so the restart itself runs on
    the manager's thread, never concurrently with its bookkeeping.
    """

    def __init__(self, manager: Any, interval: float) -> None:
        super().__init__(name="watchdog", daemon=True)
        self._manager = manager
        self._interval = interval
        self._stopping = threading.Event()
        self._requested: set[int] = set()

    def stop(self) -> None:
        self._stopping.set()

    def stop_on_signals(self, deadline_seconds: float) -> None:
        """On SIGTERM/SIGINT: stop watching, then let Sanic's own handler shut down."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            sanic_handler = signal.getsignal(sig)

            def handler(signum: int, frame: Any, then: Any = sanic_handler) -> None:
                self.stop()
                timer = threading.Timer(deadline_seconds, _exit_if_stuck, (self._manager,))
                timer.daemon = True
                timer.start()
                if callable(then):
                    then(signum, frame)

            signal.signal(sig, handler)

    def run(self) -> None:
        from sanic.worker.constants import ProcessState

        # restarts are counted by Sanic itself ("starts" in its shared worker
        # state), which /metrics exposes as process_restarts
        while not self._stopping.wait(self._interval):
            for process in list(self._manager.processes):
                if process.is_alive() or process.state in (
                    ProcessState.RESTARTING,
                    ProcessState.NONE,
                    ProcessState.IDLE,
                ):
                    continue
                if process.state not in (ProcessState.FAILED, ProcessState.COMPLETED):
                    continue  # the manager's monitor loop has not synced it yet
                if process.pid in self._requested:
                    continue
                self._requested.add(process.pid)
                log.error(
                    "process %s (pid %s) died with exit code %s; restarting it",
                    process.name,
                    process.pid,
                    process.exitcode,
                )
                metrics.mark_process_dead(process.pid)
                self._manager.monitor_publisher.send(process.name)


def _exit_if_stuck(manager: Any) -> None:
    """Sanic 25.12's main process can hang for good when SIGTERM arrives while it waits
    for its workers to start (``wait_for_ack`` blocks on its pipe). After the grace,
    finish what it would have: stop what is left, then exit."""
    alive = [p for p in manager.processes if p.is_alive()]
    for process in alive:
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGKILL)
    log.error("the main process was still running after the shutdown grace; %d processes "
              "killed, exiting", len(alive))  # fmt: skip
    logging.shutdown()
    os._exit(1 if alive else 0)


def role_of(process_name: str) -> str:
    if "Server" in process_name:
        return "http"
    for role in ("flusher", "rollups"):
        if role in process_name:
            return role
    return process_name
