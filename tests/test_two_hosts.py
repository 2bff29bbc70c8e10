"""Two hosts, proven: network namespaces, one of them killed whole mid-traffic.

Four namespaces on one bridge: ``store`` (Redis, PostgreSQL + FerretDB),
hosts ``a`` and ``b`` (each the whole service: HTTP workers, two flushers, the
rollups process), and ``client``, which drives both hosts. Midway host ``a`` is
killed with every process it has (SIGKILL to its process group). Host ``b``'s
flushers reclaim ``a``'s pending entries after ``CLAIM_IDLE_MS``; then every
batch answered 202 is stored exactly once and the summaries are exact. Every
address is inside the namespaces; they are deleted at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.stack import ROOT, scratch_dir
from tests.harness import json_lines, unique
from tests.netns import Host, can_make_namespaces, hosts

CLAIM_IDLE_MS = 3000
PORT = 8000


def run_json(host: Host, *argv: str, timeout: float = 120) -> dict[str, Any]:
    out = subprocess.run(host.command(sys.executable, "-m", "tests.two_hosts_client", *argv),
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def network() -> Iterator[dict[str, Host]]:
    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    with hosts("store", "a", "b", "client") as made:
        yield made


@pytest.fixture
def store_dir() -> Iterator[Path]:
    with scratch_dir("two-hosts-store-") as path:
        yield path


def start(host: Host, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    proc = subprocess.Popen(
        host.command(*argv), cwd=ROOT, env={**os.environ, **env}, stdout=out,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out.close()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_hosts_one_killed_whole_nothing_lost(
    network: dict[str, Host], tmp_path: Path, store_dir: Path
) -> None:
    store_log = tmp_path / "store.log"
    store = subprocess.Popen(
        network["store"].command(sys.executable, "-m", "scripts.stack", "serve",
                                 "--host", network["store"].address,
                                 "--var-dir", str(store_dir)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=store_log.open("ab"), start_new_session=True,
    )  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = [store]
    try:
        assert store.stdout is not None
        urls = json.loads(store.stdout.readline())
        run = unique("run")
        common = {**urls, "MONGO_DB": unique("two"), "STREAM_KEY": unique("two"),
                  "CLAIM_IDLE_MS": str(CLAIM_IDLE_MS), "FLUSHERS": "2", "WORKERS": "1",
                  "PORT": str(PORT), "SUMMARY_CACHE_SECONDS": "0",
                  "WATCHDOG_INTERVAL_SECONDS": "0.5",
                  # beyond loopback, but in namespaces only this test reaches
                  "AUTH": "open"}  # fmt: skip
        services = {}
        for name in ("a", "b"):
            host = network[name]
            env = {**common, "HOST": host.address, "INSTANCE_NAME": f"host-{name}",
                   "VAR_DIR": str(tmp_path / name),
                   "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / name / "metrics")}  # fmt: skip
            (tmp_path / name / "metrics").mkdir(parents=True)
            services[name] = start(host, [sys.executable, "-m", "scripts.serve"], env,
                                   tmp_path / f"{name}.log")  # fmt: skip
            processes.append(services[name])
        client = network["client"]
        urls_of = {n: f"http://{network[n].address}:{PORT}" for n in ("a", "b")}
        for url in urls_of.values():
            assert run_json(client, "wait", "--url", url)["ready"], (tmp_path / "a.log").read_text()
        log, stop_file = tmp_path / "batches.jsonl", tmp_path / "stop"
        driver = start(client, [sys.executable, "-m", "tests.two_hosts_client", "drive",
                                "--hosts", ",".join(urls_of.values()), "--run", run,
                                "--log", str(log), "--stop", str(stop_file)], {},
                       tmp_path / "driver.log")  # fmt: skip
        processes.append(driver)

        def accepted_from(url: str) -> int:
            lines = json_lines(log)
            return sum(1 for b in lines if b["host"] == url and b["outcome"] == "accepted")

        deadline = time.monotonic() + 60
        while min(accepted_from(u) for u in urls_of.values()) < 100:
            assert time.monotonic() < deadline, "traffic to both hosts"
            time.sleep(0.2)
        os.killpg(services["a"].pid, signal.SIGKILL)  # host a dies with every process it has
        killed_at = time.monotonic()
        services["a"].wait()
        after = accepted_from(urls_of["b"])
        while accepted_from(urls_of["b"]) < after + 100:
            assert time.monotonic() < deadline + 60, "host b keeps taking traffic"
            time.sleep(0.2)
        stop_file.touch()
        assert driver.wait(60) == 0
        redis_args = ["--redis", urls["REDIS_URL"], "--stream-key", common["STREAM_KEY"]]
        reclaimed_after = None
        while time.monotonic() < killed_at + 120:
            left = run_json(client, "pending", *redis_args, "--consumers", "host-a:")
            if left["pending"] == 0:
                reclaimed_after = time.monotonic() - killed_at
                break
            time.sleep(0.5)
        assert reclaimed_after is not None, "host a's pending entries were never reclaimed"
        while run_json(client, "pending", *redis_args, "--consumers", "host-")["depth"] > 0:
            assert time.monotonic() < killed_at + 180, "the queue drains"
            time.sleep(0.5)
        verdict = run_json(client, "verify", *redis_args, "--mongo", urls["MONGO_URL"],
                           "--db", common["MONGO_DB"], "--service", urls_of["b"], "--run", run,
                           "--log", str(log))  # fmt: skip
        report = {**verdict, "reclaimed_after_s": round(reclaimed_after, 1),
                  "claim_idle_ms": CLAIM_IDLE_MS}  # fmt: skip
        (tmp_path / "two_hosts.json").write_text(json.dumps(report))
        print("two hosts:", json.dumps(report))
        assert verdict["ok"], verdict["problems"]
        assert verdict["accepted_events"] > 0
        assert verdict["summaries_checked"] == 5
    finally:
        for proc in reversed(processes):
            stop(proc)
