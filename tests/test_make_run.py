"""`make run` as a user runs it: what it stores survives any stop, and nothing outlives it.

Each test starts `make run` on a private VAR_DIR (a session of its own, as a
terminal's foreground job), sends events, stops it the way the test names (a
power cut: every process SIGKILLed at once; a Ctrl-C or SIGTERM to the process
group; the launcher alone SIGKILLed), checks that no process is left, starts it
again on the same VAR_DIR and checks that every accepted event is stored once
and every window of /summary equals the raw events.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest

from scripts.stack import ROOT, free_port, scratch_dir
from tests.harness import MARKER, assert_none_left, processes_marked
from tests.oracle import figures, ground_truth, parse_iso
from tests.support import iso, unique, wait_for

WINDOWS = ("15m", "1h", "6h", "24h", "7d", "30d")
GRACE = 5  # SHUTDOWN_GRACE_SECONDS
# what a clean stop must not print
NOISE = ("Traceback", "Task was destroyed", "Broken pipe", "Killing",
         "still running after the shutdown grace", "KeyboardInterrupt")  # fmt: skip


@dataclass
class MakeRun:
    """`make run` in the foreground of a session of its own, on ``var_dir``."""

    var_dir: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    db_name: str = field(default_factory=lambda: unique("makerun"))
    proc: subprocess.Popen[bytes] | None = None
    marker: str = ""
    log_path: Path | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.marker = unique("makerun")
        # a new port each start: on a busy machine the last one may be some client's by
        # now; INSTANCE_NAME keeps the flusher's consumer name (and its pending entries)
        self.port = free_port()
        self.log_path = self.log_dir / f"make-run-{self.starts}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "MONGO_URL", "PROMETHEUS_MULTIPROC_DIR")}  # fmt: skip
        env |= {"VAR_DIR": str(self.var_dir), "PORT": str(self.port), "WORKERS": "1",
                "MONGO_DB": self.db_name, "SHUTDOWN_GRACE_SECONDS": str(GRACE),
                "SUMMARY_CACHE_SECONDS": "0", "INSTANCE_NAME": self.db_name,
                MARKER: self.marker}  # fmt: skip
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        wait_for(self.ready, 120, 0.2, "make run to answer /ready")

    def ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"make run exited: {self.log()}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path else ""

    def mongo_url(self) -> str:
        found: list[str] = re.findall(r"FerretDB on (mongodb://\S+)", self.log())
        assert found, self.log()
        return found[-1]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command-line tool run beside it, as a user would: only VAR_DIR set."""
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGO_URL")}
        env |= {"VAR_DIR": str(self.var_dir), "MONGO_DB": self.db_name}
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    def launcher(self) -> int:
        for pid in processes_marked(self.marker):
            with contextlib.suppress(OSError):
                if b"scripts.stack" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        raise AssertionError(f"no launcher among {processes_marked(self.marker)}")

    def power_cut(self) -> None:
        """Every process at once, as a power cut would: stopped first so none reacts."""
        pids = processes_marked(self.marker)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self.reap()

    def signal_group(self, sig: int) -> float:
        """``sig`` to the whole foreground group (a terminal's Ctrl-C); seconds to exit."""
        assert self.proc is not None
        started = time.monotonic()
        os.killpg(self.proc.pid, sig)
        self.proc.wait(GRACE + 30)
        return time.monotonic() - started

    def reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(30)
        assert_none_left(self.marker, "make run")


@dataclass
class Sender:
    """Posts batches of events (times spread over the last 20 minutes, three accounts)
    in a thread; remembers every event answered 202."""

    url: str
    accounts: list[str] = field(default_factory=lambda: [unique("acc") for _ in range(3)])
    accepted: dict[str, set[str]] = field(default_factory=dict)
    # sent when the service went away: taken or not, nobody knows (a retry would be safe)
    unknown: set[str] = field(default_factory=set)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def batch(self, size: int = 50) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        out = []
        for _ in range(size):
            n = self.sent
            self.sent += 1
            out.append({"event_id": f"e{n}", "account_id": self.accounts[n % 3],
                        "user_id": f"u{n % 17}", "type": ("login", "page_view", "call")[n % 5 % 3],
                        "timestamp": iso(now - timedelta(seconds=(n * 7) % 1200 + 1))})  # fmt: skip
        return out

    def post(self, client: httpx.Client) -> None:
        events = self.batch()
        try:
            response = client.post(f"{self.url}/events", json=events)
        except httpx.HTTPError:
            self.unknown.update(e["event_id"] for e in events)
            return
        if response.status_code == 202:
            for e in events:
                self.accepted.setdefault(e["account_id"], set()).add(e["event_id"])

    def send(self, batches: int) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(batches):
                self.post(client)

    @contextlib.contextmanager
    def under_load(self) -> Iterator[None]:
        def run() -> None:
            with httpx.Client(timeout=10) as client:
                while not self._stop.is_set():
                    self.post(client)

        self._stop.clear()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(30)

    def total(self) -> int:
        return sum(len(ids) for ids in self.accepted.values())


def stored_exactly(run: MakeRun, sender: Sender) -> None:
    """Every accepted event in the store once, and every window exact, polled."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        run.mongo_url(), tz_aware=True, serverSelectionTimeoutMS=10_000
    )
    with client:
        events = client[run.db_name]["events"]

        def differences() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for a in sender.accounts:
                stored = [d["event_id"] for d in events.find({"account_id": a}, {"event_id": 1})]
                accepted = sender.accepted.get(a, set())
                maybe = accepted | sender.unknown
                if len(stored) != len(set(stored)) or not accepted <= set(stored) <= maybe:
                    out[a] = {"stored": len(stored), "accepted": len(accepted),
                              "missing": sorted(accepted - set(stored))[:10],
                              "extra": sorted(set(stored) - maybe)[:10]}  # fmt: skip
            return out

        try:
            wait_for(lambda: not differences(), 120, 0.5, "accepted events stored exactly once")
        except AssertionError:
            raise AssertionError(f"not stored exactly once: {differences()}") from None

        def exact() -> list[str]:
            wrong = []
            for account in sender.accounts:
                for window in WINDOWS:
                    got = httpx.get(f"{run.url}/summary/{account}", params={"window": window},
                                    timeout=10).json()  # fmt: skip
                    truth = ground_truth(events, account, parse_iso(got["from"]),
                                         parse_iso(got["to"]), 5)  # fmt: skip
                    if figures(got) != truth:
                        wrong.append(f"{account} {window}: {figures(got)} != {truth}")
            return wrong

        # the rollups process folds the restored events in once a minute: until then the
        # tails answer; either way every window must equal the raw events
        wait_for(lambda: not exact(), 90, 1, "every window exact")
        assert not exact()


@pytest.fixture
def var_dir() -> Iterator[Path]:
    with scratch_dir("make-run-") as path:
        yield path / "var"


@pytest.fixture
def run(var_dir: Path, tmp_path: Path) -> Iterator[MakeRun]:
    made = MakeRun(var_dir=var_dir, log_dir=tmp_path)
    yield made
    if made.proc and made.proc.poll() is None:
        with contextlib.suppress(Exception):
            made.signal_group(signal.SIGTERM)
    if made.marker:
        assert_none_left(made.marker, "make run")


def test_a_power_cut_under_load_loses_nothing_stored(run: MakeRun) -> None:
    run.start()
    sender = Sender(run.url)
    sender.send(20)
    stored_exactly(run, sender)  # stored and rolled up before the cut
    with sender.under_load():
        wait_for(lambda: sender.total() >= 3000, 60, 0.1, "traffic")
        run.power_cut()
    assert sender.total() >= 3000
    run.start()
    stored_exactly(run, sender)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_clean_stop_is_quick_quiet_and_keeps_everything(run: MakeRun, sig: int) -> None:
    run.start()
    sender = Sender(run.url)
    sender.send(20)
    stored_exactly(run, sender)
    with sender.under_load():
        wait_for(lambda: sender.total() >= 2500, 60, 0.1, "traffic")
        took = run.signal_group(sig)
    assert took < GRACE + 5, f"stopping took {took:.1f}s: {run.log()}"
    output = run.log()
    assert not [n for n in NOISE if n in output], output
    assert_none_left(run.marker, "make run")
    stopped = run.cli("scripts.keys", "list")
    assert stopped.returncode == 2 and "make run" in stopped.stderr
    run.start()
    stored_exactly(run, sender)
    # the command-line tools find the servers of the running `make run` by themselves
    made = run.cli("scripts.keys", "create", "--scope", "read", "--account", sender.accounts[0])
    assert made.returncode == 0 and made.stdout.startswith("evk_"), made.stderr


def test_the_launcher_killed_alone_takes_everything_with_it(run: MakeRun) -> None:
    run.start()
    sender = Sender(run.url)
    sender.send(10)
    os.kill(run.launcher(), signal.SIGKILL)
    run.reap()  # every server and the service stop by themselves
    run.start()
    stored_exactly(run, sender)
