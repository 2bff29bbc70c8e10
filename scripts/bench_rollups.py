"""The rollups part of `make bench` (``--only rollups``): one pass over many active accounts.

For each number of active accounts (5k, 20k, 50k by default) and each number of
rollups processes (1 and 2), on a fresh database:

1. start that many real rollups processes (``rollups.scheduler``, the code
   ``make run`` runs, each its own OS process, ``ROLLUP_PARTITIONS`` partitions
   shared between them) and wait until they have split the partitions;
2. every round: write each account's live tail straight into Redis as a
   flusher would (two tail entries of three events, in the current minute,
   and the account in its dirty set), then wait for the next minute's pass,
   and read what each process logged ("rolled N accounts to HH:MM in S s").

The first round creates every account's head, and gives it a little history:
events in the minutes that leave its 15m, 1h, 6h and 24h windows during the
next rounds, so that each later pass subtracts a bucket from each of those
windows, as it does for an account active all day. The later rounds are the
steady state that is reported (an account active every minute; retiring what
they superseded every ``ROLLUP_SWEEP_EVERY`` rollovers, staggered, is part of
it). The pass time is the longest of the processes' (they run at once); the
per-account cost is the processes' summed pass time over the accounts.

    python -m scripts.bench --only rollups [--rollup-accounts 5000 20000]
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import keys, store, tail
from core.buckets import MINUTE, WINDOWS, floor
from core.connections import connect_redis
from core.settings import Settings, load_settings
from core.tail import redis_time_ms
from scripts.stack import ROOT, Stack

ACCOUNTS = (5_000, 20_000, 50_000)
PROCESSES = (1, 2)
PARTITIONS = 8
ROUNDS = 3  # the first creates the heads; the others are reported
ENTRIES_PER_ACCOUNT = 2
EVENTS_PER_ENTRY = 3
SEED_CHUNK = 2_000  # accounts per pipeline
SKIPPED_AT_MOST = 8  # minutes a round waits past its own for a pass
SEED_MARGIN_MS = 12_000  # seed only if this much of the minute is left
HISTORY_MINUTES = 8  # minutes of history leaving each minute-bucket window, one a round
HISTORY_WINDOWS = ("15m", "1h", "6h", "24h")
TYPES = ("page_view", "message_sent", "login")
PASS_LINE = re.compile(r"rolled (\d+) accounts to (\d\d:\d\d) in ([\d.]+) s")

RUN_PROCESS = "from core.settings import load_settings; from rollups.scheduler import " \
    "rollups_process; rollups_process(load_settings())"  # fmt: skip


@dataclass
class Pass:
    """One minute's pass: what each process logged, and when the last one ended."""

    accounts: int
    seconds: float  # the longest process's own figure
    per_process: list[tuple[int, float]] = field(default_factory=list)
    skipped: int = 0  # minutes no pass rolled to, the passes before being too long

    @property
    def per_account_ms(self) -> float:
        return 1000 * sum(s for _, s in self.per_process) / max(1, self.accounts)


@dataclass
class Case:
    accounts: int
    processes: int
    first: Pass | None = None
    steady: list[Pass] = field(default_factory=list)

    def median_seconds(self) -> float:
        return statistics.median(p.seconds for p in self.steady) if self.steady else 0.0

    def median_per_account_ms(self) -> float:
        return statistics.median(p.per_account_ms for p in self.steady) if self.steady else 0.0


def case_settings(stack: Stack, run: str, partitions: int) -> dict[str, str]:
    return {"REDIS_URL": stack.redis_url, "MONGO_URL": stack.mongo_url,
            "MONGO_DB": f"bench_rollups_{run}", "STREAM_KEY": f"bench:rollups:{run}",
            "ROLLUP_PARTITIONS": str(partitions), "LOG_LEVEL": "INFO"}  # fmt: skip


def start_processes(env: dict[str, str], count: int, logs: Path, code: Path) -> list[Any]:
    """``count`` rollups processes as ``make run`` starts them (the code under ``code``)."""
    started = []
    for n in range(count):
        log = logs / f"rollups-{n}.log"
        full = {**os.environ, **env, "PYTHONPATH": str(code)}
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
        command = [sys.executable, "-c", RUN_PROCESS]
        started.append(subprocess.Popen(command, cwd=code, env=full, stdout=subprocess.DEVNULL,
                                        stderr=log.open("w")))  # fmt: skip
    return started


def logged_passes(logs: Path, label: str) -> list[tuple[int, float]]:
    """(accounts, seconds) of every pass to minute ``label`` (HH:MM) the processes logged."""
    found = []
    for path in sorted(logs.glob("rollups-*.log")):
        for match in PASS_LINE.finditer(path.read_text(errors="replace")):
            if match.group(2) == label:
                found.append((int(match.group(1)), float(match.group(3))))
    return found


async def seed(settings: Settings, accounts: Sequence[str], start: int, now: int,
               rng: random.Random, history: bool = False) -> None:  # fmt: skip
    """Each account's tail as the flusher leaves it after two flushes in this minute
    (and, with ``history``, one of events in the minutes that leave its windows next)."""
    edges = [start + MINUTE - WINDOWS[w] for w in HISTORY_WINDOWS]
    past = [edge + k * MINUTE + 1 for edge in edges for k in range(HISTORY_MINUTES)]
    client = connect_redis(settings.redis_url)
    parts = keys.partitions(settings)
    try:
        for chunk in range(0, len(accounts), SEED_CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for account in accounts[chunk : chunk + SEED_CHUNK]:
                    part = parts[rng.randrange(len(parts))]
                    for _ in range(ENTRIES_PER_ACCOUNT):
                        events = tail.TailEvents(
                            [rng.randrange(start, now) for _ in range(EVENTS_PER_ENTRY)],
                            [rng.choice(TYPES) for _ in range(EVENTS_PER_ENTRY)],
                            [f"user_{rng.randrange(3)}" for _ in range(EVENTS_PER_ENTRY)],
                        )
                        pipe.xadd(part.tail(account), {"e": tail.encode(events)})
                    if history:
                        users = [f"user_{rng.randrange(3)}" for _ in past]
                        old = tail.TailEvents(past, [rng.choice(TYPES) for _ in past], users)
                        pipe.xadd(part.tail(account), {"e": tail.encode(old)})
                    pipe.sadd(keys.account_dirty_set(settings, part, account), account)
                await pipe.execute()
    finally:
        await client.aclose()


async def redis_now(settings: Settings) -> int:
    client = connect_redis(settings.redis_url)
    try:
        return redis_time_ms(await client.time())
    finally:
        await client.aclose()


async def drop(settings: Settings) -> None:
    client = connect_redis(settings.redis_url)
    mongo = store.connect(settings)
    try:
        await mongo.drop_database(settings.mongo_db)
        async for key in client.scan_iter(match=f"*{settings.stream_key}*", count=1000):
            await client.delete(key)
        async for key in client.scan_iter(match=f"*{settings.mongo_db}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()
        await mongo.close()


def label(minute: int) -> str:
    return time.strftime("%H:%M", time.gmtime(minute / 1000))


def wait_for_pass(logs: Path, minute: int, accounts: int, timeout: float) -> Pass:
    """The first pass that rolled every account to ``minute`` or later: a pass longer
    than a minute makes the next one roll to a later minute, skipping the ones between
    (``skipped`` says how many: the lag grows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for later in range(SKIPPED_AT_MOST + 1):
            found = logged_passes(logs, label(minute + later * MINUTE))
            if sum(n for n, _ in found) >= accounts:
                return Pass(accounts, max(s for _, s in found), found, skipped=later)
        time.sleep(0.2)
    raise RuntimeError(f"no pass rolled {accounts} accounts to {label(minute)} within "
                       f"{timeout:.0f} s: {logged_passes(logs, label(minute))}")  # fmt: skip


def run_case(stack: Stack, work: Path, accounts: int, processes: int, rounds: int,
             partitions: int = PARTITIONS, code: Path = ROOT) -> Case:  # fmt: skip
    run = f"{accounts}_{processes}_{os.getpid()}"
    env = case_settings(stack, run, partitions)
    settings = load_settings(env)
    asyncio.run(drop(settings))
    logs = work / f"rollups-{run}"
    logs.mkdir(parents=True, exist_ok=True)
    names = [f"acct_{i:06d}" for i in range(accounts)]
    rng = random.Random(accounts * 10 + processes)
    case = Case(accounts, processes)
    started = start_processes(env, processes, logs, code)
    try:
        time.sleep(8 if processes > 1 else 3)  # start-up, then the partitions split
        for round_ in range(rounds):
            now = asyncio.run(redis_now(settings))
            if MINUTE - now % MINUTE < SEED_MARGIN_MS:  # too close to the next minute
                time.sleep((MINUTE - now % MINUTE) / 1000 + 1)
                now = asyncio.run(redis_now(settings))
            start = floor(now, "minute")
            asyncio.run(seed(settings, names, start, now, rng, history=round_ == 0))
            done = wait_for_pass(logs, start + MINUTE, accounts, 600)
            print(f"[bench] rollups {accounts:,} accounts, {processes} process(es), round "
                  f"{round_}: {done.seconds:.2f} s ({done.per_process}), "
                  f"{done.per_account_ms:.2f} ms per account"
                  + (f", {done.skipped} minute(s) skipped" if done.skipped else ""),
                  flush=True)  # fmt: skip
            if round_ == 0:
                case.first = done
            else:
                case.steady.append(done)
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        asyncio.run(drop(settings))
    return case


def main(argv: list[str] | None = None) -> int:
    """A case on its own: ``python -m scripts.bench_rollups ACCOUNTS PROCESSES [CODE_DIR]``
    (CODE_DIR: another checkout's code, to measure it on the same servers)."""
    from scripts.stack import running_stack, scratch_dir

    args = argv if argv is not None else sys.argv[1:]
    accounts, processes = int(args[0]), int(args[1])
    code = Path(args[2]).resolve() if len(args) > 2 else ROOT
    rounds = int(os.environ.get("BENCH_ROUNDS", ROUNDS))
    with scratch_dir("bench-rollups-") as tmp, running_stack(
        Path(tmp) / "var", os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    ) as stack:  # fmt: skip
        case = run_case(stack, Path(tmp), accounts, processes, rounds, code=code)
    print(f"{accounts} accounts, {processes} processes: steady pass {case.median_seconds():.2f} "
          f"s, {case.median_per_account_ms():.2f} ms per account")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
