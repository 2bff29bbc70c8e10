"""Helpers the tests share: the service as a real subprocess, polling, events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pymongo
import redis

from scripts.stack import ROOT, free_port

T = TypeVar("T")


def wait_for(
    check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll until ``check`` returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the server may be restarting
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: {last!r}")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_event(
    account: str,
    n: int,
    *,
    user: str = "u1",
    type_: str = "page_view",
    ts: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event = {
        "event_id": f"e{n}",
        "account_id": account,
        "user_id": user,
        "type": type_,
        "timestamp": iso(ts or datetime.now(UTC) - timedelta(seconds=1)),
    }
    event.update(extra)
    return event


@dataclass
class Service:
    """``sanic service.app:create_app --factory`` as a real subprocess."""

    env: dict[str, str]
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, wait: bool = True) -> None:
        self.log_path = log_dir / f"service-{self.port}.log"
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sanic", "service.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out.close()
        if wait:
            wait_for(self.is_ready, 60, 0.2, "the service to be ready")

    def is_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
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
        return code

    def post(self, events: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/events", json=events, timeout=10, **kwargs)

    def children(self) -> dict[int, str]:
        """pid -> process title, for every process of this service."""
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
        return [pid for pid, title in self.children().items() if title.endswith(role)]


@dataclass
class Backends:
    """Direct (synchronous) access to the servers a test's service uses."""

    redis_url: str
    mongo_url: str
    db_name: str
    stream: str

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url)
        self.mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000
        )

    @property
    def events(self) -> pymongo.collection.Collection[dict[str, Any]]:
        return self.mongo[self.db_name]["events"]

    def stored(self, account: str) -> list[dict[str, Any]]:
        return list(self.events.find({"account_id": account}))

    def count(self, account: str) -> int:
        return self.events.count_documents({"account_id": account})

    def queue_depth(self) -> int:
        return int(self.redis.get(f"{self.stream}:depth") or 0)

    def close(self) -> None:
        self.redis.close()
        self.mongo.close()


def service_env(redis_url: str, mongo_url: str, var_dir: Path, **overrides: Any) -> dict[str, str]:
    env = {
        "REDIS_URL": redis_url,
        "MONGO_URL": mongo_url,
        "VAR_DIR": str(var_dir),
        "MONGO_DB": unique("test"),
        "STREAM_KEY": unique("stream"),
        "FLUSH_INTERVAL_MS": "100",
        "CLAIM_IDLE_MS": "2000",
        "WATCHDOG_INTERVAL_SECONDS": "0.5",
    }
    # its own metrics directory, set before Sanic's main process imports
    # prometheus-client (an empty value would make it write into the cwd)
    metrics_dir = var_dir / "metrics" / env["STREAM_KEY"]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


def drained(backends: Backends, account: str, expected: int) -> Callable[[], bool]:
    return lambda: backends.count(account) == expected and backends.queue_depth() == 0


def ids(docs: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(d["event_id"] for d in docs)
