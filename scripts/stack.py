"""The stack controller: real Redis and FerretDB servers for `make run`, the tests
and the benchmarks (one implementation for all three).

- Redis is Debian's ``redis-server`` (installed with apt-get when missing and
  running as root), started on a free port, append-only file on.
- FerretDB v1.24 (SQLite backend) is the small launcher in ``scripts/ferretdb``
  built once per machine with Go into ``.cache/bin``.
- ``REDIS_URL`` / ``MONGO_URL``, when set, name servers to use instead; then
  nothing is started.

Usage::

    python -m scripts.stack setup            # install / build what is missing
    python -m scripts.stack exec -- CMD ...  # start servers, run CMD, stop servers
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FERRETDB_SRC = ROOT / "scripts" / "ferretdb"
FERRETDB_BIN = ROOT / ".cache" / "bin" / "ferretdb-launcher"
START_TIMEOUT = 30.0


class StackError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_debian_package(binary: str, package: str, alternative: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` with apt-get when missing."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(
            f"{binary} is missing: install Debian's package with "
            f"`sudo apt-get install {package}`{alternative}"
        )
    log(f"installing Debian's {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        check=True,
        env=env,
    )
    found = shutil.which(binary)
    if not found:
        raise StackError(f"apt-get installed {package} but {binary} is not on PATH")
    return found


def ensure_redis_server() -> str:
    return ensure_debian_package("redis-server", "redis-server", ", or set REDIS_URL")


def ensure_wrk() -> str:
    """The HTTP load generator for ``make bench`` (light on CPU, unlike k6)."""
    return ensure_debian_package("wrk", "wrk", "")


def ensure_ferretdb() -> Path:
    sources = [*FERRETDB_SRC.glob("*.go"), FERRETDB_SRC / "go.mod", FERRETDB_SRC / "go.sum"]
    newest = max(p.stat().st_mtime for p in sources)
    if FERRETDB_BIN.exists() and FERRETDB_BIN.stat().st_mtime >= newest:
        return FERRETDB_BIN
    go = shutil.which("go")
    if not go:
        raise StackError("Go is needed to build FerretDB (scripts/ferretdb), or set MONGO_URL")
    log("building FerretDB v1.24 launcher with Go (once per machine, ~1-2 min)")
    FERRETDB_BIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = FERRETDB_BIN.with_suffix(".tmp")
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(tmp), "."],
        cwd=FERRETDB_SRC,
        check=True,
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"},
    )
    tmp.replace(FERRETDB_BIN)
    return FERRETDB_BIN


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, logfile: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise StackError(f"{name} exited with {proc.returncode} at start-up:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{name} did not listen on port {port} within {START_TIMEOUT:.0f}s")


@dataclass(kw_only=True)
class Server:
    """One server process we own: start, stop (SIGTERM), kill (SIGKILL), restart."""

    name: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def logfile(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.logfile, "ab")  # noqa: SIM115 - the child owns it
        # own session: a Ctrl-C meant for the app must not kill the servers it drains into
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        _wait_for_port(self.port, self.proc, self.name, self.logfile)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass(kw_only=True)
class RedisServer(Server):
    name: str = "redis"
    fsync: str = "always"

    def command(self) -> list[str]:
        binary = ensure_redis_server()
        return [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()), "--appendonly", "yes",
            "--appendfsync", self.fsync, "--save", "", "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass(kw_only=True)
class FerretDBServer(Server):
    name: str = "ferretdb"

    def command(self) -> list[str]:
        binary = ensure_ferretdb()
        return [
            str(binary), "--listen", f"127.0.0.1:{self.port}",
            "--sqlite-dir", str(self.data_dir.resolve() / "sqlite"),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"


@dataclass(kw_only=True)
class Stack:
    redis_url: str
    mongo_url: str
    redis: RedisServer | None = None
    mongo: FerretDBServer | None = None

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "MONGO_URL": self.mongo_url}

    def stop(self) -> None:
        for server in (self.redis, self.mongo):
            if server:
                server.stop()


@contextmanager
def running_stack(var_dir: Path, redis_url: str = "", mongo_url: str = "") -> Iterator[Stack]:
    """Start what is not given by URL under ``var_dir``; stop it on exit."""
    redis = None if redis_url else RedisServer(data_dir=var_dir / "redis")
    mongo = None if mongo_url else FerretDBServer(data_dir=var_dir / "ferretdb")
    try:
        if redis:
            redis.start()
            log(f"redis-server on {redis.url} (data in {redis.data_dir})")
        if mongo:
            mongo.start()
            log(f"FerretDB on {mongo.url} (data in {mongo.data_dir})")
        yield Stack(
            redis_url=redis_url or (redis.url if redis else ""),
            mongo_url=mongo_url or (mongo.url if mongo else ""),
            redis=redis,
            mongo=mongo,
        )
    finally:
        for server in (redis, mongo):
            if server:
                server.stop()


def exec_with_stack(command: Sequence[str]) -> int:
    from service.config import load_settings

    settings = load_settings()
    with running_stack(settings.var_dir, settings.redis_url, settings.mongo_url) as stack:
        child = subprocess.Popen(list(command), env={**os.environ, **stack.env()})

        def forward(signum: int, _frame: object) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        code = child.wait()
        log(f"{command[0]} exited with {code}; stopping servers")
        return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("setup", help="install redis-server and build FerretDB if missing")
    run = sub.add_parser("exec", help="start the servers, run a command, stop them")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.verb == "setup":
            ensure_redis_server()
            ensure_ferretdb()
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("exec needs a command after --")
        return exec_with_stack(command)
    except StackError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
