"""The watchdog: restarts any process of the service that died.

Sanic 25.12 does not restart a process that dies (a SIGKILLed HTTP worker or
managed process stays dead while the main process runs on), so the main
process runs this thread, which asks Sanic's worker manager to restart any
process found dead, logs it and counts it.

It also makes SIGTERM/SIGINT end the main process whenever they arrive: Sanic
25.12's manager loops for good on a shutdown signal that arrives while it
waits for its HTTP workers to acknowledge start-up (``wait_for_ack`` re-sends
the shutdown message to itself), so such a signal is held until every worker
has acknowledged, and a safety net exits after the shutdown grace whatever
happens. The shutdown itself runs in the manager's loop (its ``__TERMINATE__``
message), not in the signal handler as Sanic's own handler does: that one
writes the processes' shared state, and a signal that lands while the loop is
mid-call to the same state's manager reads the loop's reply (``'NoneType'
object is not a mapping``), and the main process exits 1 — seen once in a
fresh-clone run. A second signal still goes to Sanic's handler (it kills).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
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
        self._acked = threading.Event()
        self._held_signal: int | None = None
        self._hand_over = threading.Lock()
        self._terminating = False

    def stop(self) -> None:
        self._stopping.set()

    def stop_on_signals(self, deadline_seconds: float) -> None:
        """On SIGTERM/SIGINT: stop watching, then let Sanic's own handler shut down, once
        its workers have acknowledged start-up; exit after ``deadline_seconds`` anyway."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            sanic_handler = signal.getsignal(sig)

            def handler(signum: int, frame: Any, then: Any = sanic_handler) -> None:
                if not self._stopping.is_set():
                    self.stop()
                    timer = threading.Timer(deadline_seconds, _exit_if_stuck, (self._manager,))
                    timer.daemon = True
                    timer.start()
                with self._hand_over:
                    if not self._acked.is_set():
                        self._held_signal = signum  # delivered again by run()
                        return
                if not self._terminating:
                    self._terminating = True
                    log.info("Received signal %s. Shutting down.", signal.Signals(signum).name)
                    self._manager.monitor_publisher.send("__TERMINATE__")
                elif callable(then):
                    then(signum, frame)  # a second signal: Sanic's handler kills

            signal.signal(sig, handler)

    def run(self) -> None:
        self._wait_for_acks()
        self._restart_dead_processes()

    def _wait_for_acks(self) -> None:
        """Wait until Sanic's manager is past its start-up acks, then deliver a held signal.

        Its workers' shared states say "acknowledged" up to 0.1 s before the manager's
        loop notices, and a shutdown in that gap still loops for good, so this watches
        the main thread itself: in the manager's monitor loop, out of ``wait_for_ack``.
        """
        main = threading.main_thread().ident
        while True:
            frame = sys._current_frames().get(main or 0)
            if frame is None:
                return
            names = {f.f_code.co_name for f, _ in traceback.walk_stack(frame)}
            if "monitor" in names and "wait_for_ack" not in names:
                break
            threading.Event().wait(0.05)
        with self._hand_over:
            self._acked.set()
            held = self._held_signal
        if held is not None:
            os.kill(os.getpid(), held)

    def _restart_dead_processes(self) -> None:
        from sanic.worker.constants import ProcessState

        # restarts are counted by Sanic itself ("starts" in its shared worker
        # state), which /metrics exposes as process_restarts
        while not self._stopping.wait(self._interval):
            metrics.report_rss("main")
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
    """The safety net: if the main process is still running after the shutdown grace
    (a shutdown Sanic never finishes), stop what is left, then exit."""
    # the service's processes, and multiprocessing's own (the manager of Sanic's shared
    # worker state), which os._exit would otherwise leave behind
    processes = [*manager.processes, *multiprocessing.active_children()]
    alive = {p.pid for p in processes if p.is_alive()}
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
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
