"""Profile the ingest hot path: wrk load on the service, py-spy on one HTTP worker.

    python -m scripts.profile_ingest [--batch 10] [--seconds 10] [--workers 2]

Starts its own servers and the service (flusher and rollups off, as in
``make bench``), drives ``POST /events`` with wrk, samples one HTTP worker with
py-spy, and prints the functions with the most samples (own time and
cumulative). The raw profile is kept as ``var/profile-<batch>.txt``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from scripts.bench import make_body, wrk_once
from scripts.stack import ROOT, running_stack, scratch_dir
from tests.harness import Service, dev_tool, service_env

LINE_NUMBER = re.compile(r":\d+\)$")


def top_functions(
    collapsed: str, limit: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(own samples, cumulative samples) per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += int(count)
        for frame in set(frames):
            cumulative[frame] += int(count)
    return own.most_common(limit), cumulative.most_common(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.profile_ingest", description=__doc__)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    out = ROOT / "var" / f"profile-{args.batch}.txt"
    out.parent.mkdir(exist_ok=True)
    with scratch_dir("profile-") as tmp, running_stack(
        Path(tmp) / "var", os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    ) as stack:  # fmt: skip
        work = Path(tmp)
        body_file = work / "body.json"
        body_file.write_bytes(make_body(args.batch, random.Random(3)))
        env = service_env(stack.redis_url, stack.mongo_url, work, roles="http",
                          queue_max_events=10**12)  # fmt: skip
        service = Service(env, workers=args.workers)
        service.start(work)
        try:
            worker = service.pids_titled("http worker")[0]
            load = threading.Thread(
                target=wrk_once, args=(service.url, body_file, args.seconds + 2), daemon=True
            )
            load.start()
            subprocess.run(
                [dev_tool("py-spy"), "record", "--pid", str(worker),
                 "--duration", str(int(args.seconds)),
                 "--format", "raw", "--nonblocking", "--output", str(out)],
                check=True, capture_output=True,
            )  # fmt: skip
            load.join()
        finally:
            service.stop()
    own, cumulative = top_functions(out.read_text(), args.top)
    total = sum(int(line.rpartition(" ")[2]) for line in out.read_text().splitlines())
    print(f"{total} samples of one HTTP worker, batch {args.batch}; raw stacks in {out}\n")
    for title, rows in (("own time", own), ("cumulative", cumulative)):
        print(f"--- {title} ---")
        for frame, count in rows:
            print(f"{100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
