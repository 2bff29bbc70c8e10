"""The stack controller: real Redis and FerretDB servers for `make run`, the tests
and the benchmarks (one implementation for all three).

- Redis is Debian's ``redis-server`` (installed with apt-get when missing and
  running as root), started on a free port, append-only file on.
- The MongoDB-protocol server is FerretDB v1.24 on Debian's PostgreSQL: the
  small launcher in ``scripts/ferretdb`` (built once per machine with Go into
  ``.cache/bin``) in front of a ``postgres`` started on a free port, with the
  store-specific index set-up of ``scripts/ferretdb/postgresql-setup.sql``.
- ``REDIS_URL`` / ``MONGO_URL``, when set, name servers to use instead; then
  nothing is started.

Usage::

    python -m scripts.stack setup            # install / build what is missing
    python -m scripts.stack exec -- CMD ...  # start servers, run CMD, stop servers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from core.lifetime import signal_on_parent_death

ROOT = Path(__file__).resolve().parent.parent
FERRETDB_SRC = ROOT / "scripts" / "ferretdb"
FERRETDB_BIN = ROOT / ".cache" / "bin" / "ferretdb-launcher"
POSTGRES_SETUP = FERRETDB_SRC / "postgresql-setup.sql"
POSTGRES_USER = "postgres"  # Debian's package creates it; PostgreSQL refuses to run as root
FERRETDB_DATABASE = "ferretdb"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
ZOMBIE_WAIT = 5.0  # for a killed postmaster to be collected before its lock is cleared


class StackError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory the postgres user can reach (``mkdtemp`` makes 0700 ones,
    and so does pytest), removed afterwards: for tests and benchmarks only."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def postgres_bin_dir() -> Path:
    """Debian's PostgreSQL server binaries (``initdb``, ``postgres``), installed when missing."""

    def newest() -> Path | None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                       key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                       else 0)  # fmt: skip
        return found[-1].parent if found else None

    if (found := newest()) and shutil.which("psql"):
        return found
    ensure_debian_package("pg_ctlcluster", "postgresql", ", or set MONGO_URL")
    found = newest()
    if not found:
        raise StackError("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/postgres")
    return found


WEB = ROOT / "web"
WEB_STAMP = WEB / "node_modules" / ".installed"


def ensure_chromium() -> str:
    """Debian's chromium, for the browser tests (driven over the DevTools protocol, so
    no chromium-driver)."""
    return ensure_debian_package("chromium", "chromium", "")


def ensure_web_packages() -> Path:
    """The browser SDKs pinned in ``web/package-lock.json``, installed with ``npm ci`` into
    ``web/node_modules`` when missing or older than the lock file (the browser tests
    serve them from there: no CDN)."""
    modules = WEB / "node_modules"
    newest = max(p.stat().st_mtime for p in (WEB / "package.json", WEB / "package-lock.json"))
    if WEB_STAMP.exists() and WEB_STAMP.stat().st_mtime >= newest:
        return modules
    npm = shutil.which("npm") or ensure_debian_package("npm", "npm", "")
    log("installing the browser SDKs of web/package-lock.json with npm ci")
    # --ignore-scripts: the files are served as published, nothing needs building
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                   cwd=WEB, check=True)  # fmt: skip
    WEB_STAMP.touch()
    return modules


def ensure_wrk() -> str:
    """The HTTP load generator for ``make bench`` (light on CPU, unlike k6)."""
    return ensure_debian_package("wrk", "wrk", "")


def go_build(source: Path, binary: Path, what: str, missing_go: str) -> Path:
    """``binary`` built from the Go module in ``source`` when missing or older than it."""
    sources = [*source.glob("*.go"), source / "go.mod", source / "go.sum"]
    newest = max(p.stat().st_mtime for p in sources)
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    go = shutil.which("go")
    if not go:
        raise StackError(missing_go)
    log(f"building {what} with Go (once per machine, ~1-2 min)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(tmp), "."],
        cwd=source,
        check=True,
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"},
    )
    tmp.replace(binary)
    return binary


def ensure_ferretdb() -> Path:
    missing_go = "Go is needed to build FerretDB (scripts/ferretdb), or set MONGO_URL"
    return go_build(FERRETDB_SRC, FERRETDB_BIN, "the FerretDB v1.24 launcher", missing_go)


def _wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], name: str, logfile: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise StackError(f"{name} exited with {proc.returncode} at start-up:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
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
    host: str = "127.0.0.1"  # the address clients reach it on (and it listens on)
    proc: subprocess.Popen[bytes] | None = None
    # what stops it cleanly: sent by us, and by the kernel when whoever started it dies
    stop_signal: int = signal.SIGTERM

    def __post_init__(self) -> None:
        # servers change directory (PostgreSQL reads unix_socket_directories relative
        # to its data directory): a relative VAR_DIR such as the default `var` must not
        # be read twice from two places
        self.data_dir = self.data_dir.absolute()

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def logfile(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.reclaim()
        out = open(self.logfile, "ab")  # noqa: SIM115 - the child owns it
        # own session: a Ctrl-C meant for the app must not kill the servers it drains
        # into; the parent-death signal: they must not outlive whoever started them
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=partial(signal_on_parent_death, self.stop_signal, os.getpid()),
        )  # fmt: skip
        out.close()
        me = os.getpid()
        self.pidfile.write_text(f"{self.proc.pid} {process_identity(self.proc.pid)} "
                                f"{me} {process_identity(me)}\n")  # fmt: skip
        _wait_for_port(self.host, self.port, self.proc, self.name, self.logfile)

    def reclaim(self) -> None:
        """Stop a server an earlier start left running on this data directory (its
        launcher was killed before it could stop it): two servers must never share it."""
        try:
            pid_text, identity, starter_text, starter = self.pidfile.read_text().split()
            pid, starter_pid = int(pid_text), int(starter_text)
        except (OSError, ValueError):
            return
        if process_identity(pid) != identity:
            pass  # gone: nothing to stop
        elif starter_pid != os.getpid() and process_identity(starter_pid) == starter:
            raise StackError(
                f"{self.data_dir} is in use: its {self.name} server (pid {pid}) was started by "
                f"process {starter_pid}, which is still running; stop it first"
            )
        else:
            log(f"stopping the {self.name} server an earlier start left running (pid {pid})")
            stop_process(pid, self.stop_signal)
        self.pidfile.unlink(missing_ok=True)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
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


def process_identity(pid: int) -> str:
    """What tells this process from a later one given the same pid: the boot and the
    start time; empty when there is no such process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        started = fields[18]
    except (OSError, IndexError, ValueError):
        return ""
    return "" if state == "Z" else f"{boot}:{started}"  # a zombie is dead, only not collected


def stop_process(pid: int, signum: int, timeout: float = STOP_TIMEOUT) -> None:
    """Signal a process that is not our child, wait for it to go, SIGKILL it if it stays."""
    for sig, wait in ((signum, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
    raise StackError(f"process {pid} did not exit on SIGKILL")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet collected


@dataclass(kw_only=True)
class RedisServer(Server):
    name: str = "redis"
    fsync: str = "always"

    def command(self) -> list[str]:
        binary = ensure_redis_server()
        return [
            binary, "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data_dir.resolve()), "--appendonly", "yes",
            "--appendfsync", self.fsync, "--save", "", "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port > 55000:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass(kw_only=True)
class RedisClusterNode(RedisServer):
    """A master of a local Redis Cluster (``running_redis_cluster``)."""

    port: int = field(default_factory=cluster_port)

    def command(self) -> list[str]:
        # a dead master stops only its own slots, and is noticed within seconds
        return [*super().command(), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                "--cluster-require-full-coverage", "no"]  # fmt: skip


def _cluster_ok(node: RedisServer) -> bool:
    out = subprocess.run(["redis-cli", "-p", str(node.port), "cluster", "info"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    return "cluster_state:ok" in out


@contextmanager
def running_redis_cluster(var_dir: Path, masters: int = 3) -> Iterator[list[RedisClusterNode]]:
    """A real Redis Cluster on loopback: ``masters`` masters, no replicas, AOF on."""
    nodes = [RedisClusterNode(name=f"redis-node-{i}", data_dir=var_dir / f"redis-node-{i}")
             for i in range(masters)]  # fmt: skip
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_cluster_ok(n) for n in nodes):
            if time.monotonic() > deadline:
                raise StackError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.2)
        log(f"Redis Cluster on ports {', '.join(str(n.port) for n in nodes)}")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _as_postgres_user(parent_death_signal: int | None = None) -> list[str]:
    """A command prefix that drops root to the postgres user (exec, no extra process).

    Changing the user clears the parent-death signal, so setpriv sets it again."""
    if os.geteuid() != 0:
        return []
    death = []
    if parent_death_signal:
        death = [f"--pdeathsig={signal.Signals(parent_death_signal).name}"]
    return ["setpriv", f"--reuid={POSTGRES_USER}", f"--regid={POSTGRES_USER}",
            "--init-groups", *death, "--"]  # fmt: skip


def _blocking_parent(path: Path) -> Path | None:
    """The first directory above ``path`` the postgres user may not pass through."""
    if os.geteuid() != 0:
        return None
    for parent in reversed(path.resolve().parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


@dataclass(kw_only=True)
class PostgresServer(Server):
    """Debian's PostgreSQL, one cluster under ``data_dir``, trust auth on 127.0.0.1 only."""

    name: str = "postgres"
    stop_signal: int = signal.SIGINT  # "fast" shutdown: does not wait for clients

    @property
    def cluster(self) -> Path:
        return self.data_dir / "cluster"

    def _check_reachable(self) -> None:
        """PostgreSQL refuses to run as root, and the postgres user must reach its data
        where the user asked for it: anywhere else it would not survive a restart."""
        blocked = _blocking_parent(self.data_dir)
        if blocked is None:
            return
        raise StackError(
            f"PostgreSQL runs as the {POSTGRES_USER} user, which may not enter {blocked} "
            f"(mode {blocked.stat().st_mode & 0o777:o}), so it cannot keep its data in "
            f"{self.data_dir}. Set VAR_DIR to a directory outside it (e.g. "
            f"VAR_DIR=/var/lib/events-service), or let it through with `chmod o+x {blocked}`, "
            "or set MONGO_URL to a MongoDB of your own."
        )

    def reclaim(self) -> None:
        """Also clear PostgreSQL's own lock: a postmaster left running on this cluster is
        stopped; a lock naming a live process that is not one (its pid reused after a
        crash) is removed, since PostgreSQL would refuse to start over it."""
        super().reclaim()
        lock = self.cluster / "postmaster.pid"
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return  # no lock: nothing to clear
        # A postmaster killed with its parent stays a zombie until something collects
        # it, and PostgreSQL takes a zombie's pid for a live server: wait for it to go
        deadline = time.monotonic() + ZOMBIE_WAIT
        while _zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # its process is gone: PostgreSQL handles that itself
        if _zombie(pid):  # dead, and never collected: its lock holds nothing
            log(f"removing the lock of a dead PostgreSQL server (pid {pid}, not collected)")
            lock.unlink(missing_ok=True)
            return
        if str(self.cluster).encode() in cmdline:
            log(f"stopping the PostgreSQL server an earlier start left running (pid {pid})")
            stop_process(pid, self.stop_signal)
        elif pid != os.getpid():
            log(f"removing a stale PostgreSQL lock (pid {pid} is another program now)")
            lock.unlink(missing_ok=True)

    def _prepare(self) -> None:
        bindir = postgres_bin_dir()
        self._check_reachable()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, POSTGRES_USER, POSTGRES_USER)
        if (self.cluster / "PG_VERSION").exists():
            return
        subprocess.run(
            [*_as_postgres_user(), str(bindir / "initdb"), "-D", str(self.cluster),
             "-U", POSTGRES_USER, "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"],
            check=True, stdout=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C.UTF-8"},
        )  # fmt: skip

    def command(self) -> list[str]:
        bindir = postgres_bin_dir()
        return [
            *_as_postgres_user(self.stop_signal), str(bindir / "postgres"), "-D", str(self.cluster),
            "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.cluster}",
            # durability as shipped (fsync, synchronous_commit on): a 202 must
            # survive a crash of the store too; JIT only slows short queries
            "-c", "jit=off", "-c", "shared_buffers=256MB", "-c", "max_connections=200",
            "-c", "max_wal_size=2GB", "-c", "wal_level=minimal", "-c", "max_wal_senders=0",
        ]  # fmt: skip

    def start(self) -> None:
        self._prepare()
        super().start()
        self._install_setup()

    def _psql(self, *args: str, database: str = "postgres", script: str | None = None) -> None:
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", POSTGRES_USER, "-d", database, *args],
            check=True, stdout=subprocess.DEVNULL, input=script, text=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )  # fmt: skip

    def _install_setup(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the port opens a moment before connections are accepted
            try:
                self._psql("-c", "SELECT 1")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise StackError(f"postgres refused connections: {self.logfile}") from None
                time.sleep(0.2)
        name = FERRETDB_DATABASE
        create = (
            f"SELECT 'CREATE DATABASE {name}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{name}')\\gexec\n"
        )
        self._psql("-f", "-", script=create)
        self._psql("-f", str(POSTGRES_SETUP), database=FERRETDB_DATABASE)

    @property
    def url(self) -> str:
        # force_custom_plan: with generic plans PostgreSQL stops using the GIN
        # indexes after five executions of a prepared statement
        return (f"postgres://{POSTGRES_USER}@127.0.0.1:{self.port}/{FERRETDB_DATABASE}"
                "?plan_cache_mode=force_custom_plan&pool_max_conns=40")  # fmt: skip


@dataclass(kw_only=True)
class FerretDBServer(Server):
    name: str = "ferretdb"
    postgresql_url: str

    def command(self) -> list[str]:
        binary = ensure_ferretdb()
        return [str(binary), "--listen", f"{self.host}:{self.port}",
                "--postgresql-url", self.postgresql_url]  # fmt: skip

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"


@dataclass(kw_only=True)
class Stack:
    redis_url: str
    mongo_url: str
    redis: RedisServer | None = None
    mongo: FerretDBServer | None = None
    postgres: PostgresServer | None = None

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis_url, "MONGO_URL": self.mongo_url}

    def stop(self) -> None:
        for server in (self.redis, self.mongo, self.postgres):
            if server:
                server.stop()


@contextmanager
def running_stack(
    var_dir: Path, redis_url: str = "", mongo_url: str = "", host: str = "127.0.0.1"
) -> Iterator[Stack]:
    """Start what is not given by URL under ``var_dir``, reachable on ``host``; stop on exit."""
    redis = None if redis_url else RedisServer(data_dir=var_dir / "redis", host=host)
    postgres = None if mongo_url else PostgresServer(data_dir=var_dir / "postgres")
    mongo = None
    try:
        if redis:
            redis.start()
            log(f"redis-server on {redis.url} (data in {redis.data_dir})")
        if postgres:
            postgres.start()
            log(f"PostgreSQL on 127.0.0.1:{postgres.port} (data in {postgres.data_dir})")
            mongo = FerretDBServer(
                data_dir=var_dir / "ferretdb", postgresql_url=postgres.url, host=host
            )
            mongo.start()
            log(f"FerretDB on {mongo.url}")
        stack = Stack(
            redis_url=redis_url or (redis.url if redis else ""),
            mongo_url=mongo_url or (mongo.url if mongo else ""),
            redis=redis,
            mongo=mongo,
            postgres=postgres,
        )
        if redis or postgres:
            record_servers(var_dir, stack)
        yield stack
    finally:
        if redis or postgres:
            (var_dir / SERVERS_FILE).unlink(missing_ok=True)
        for server in (redis, mongo, postgres):
            if server:
                server.stop()


SERVERS_FILE = "servers.json"


def record_servers(var_dir: Path, stack: Stack) -> None:
    """Where the running servers listen, for the command-line tools (scripts/cli.py)."""
    me = os.getpid()
    record = {**stack.env(), "pid": me, "identity": process_identity(me)}
    (var_dir / SERVERS_FILE).write_text(json.dumps(record) + "\n")


def running_servers(var_dir: Path) -> dict[str, str]:
    """``REDIS_URL`` and ``MONGO_URL`` of the servers a live start keeps under ``var_dir``;
    empty when none is running."""
    try:
        record = json.loads((var_dir / SERVERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if process_identity(int(record["pid"])) != record["identity"]:
        return {}  # left by a start that died
    return {name: str(record[name]) for name in ("REDIS_URL", "MONGO_URL")}


def exec_with_stack(command: Sequence[str]) -> int:
    """Start the servers, run ``command`` (the service), stop the servers when it ends.

    The service runs in a session of its own, so a Ctrl-C or a SIGTERM to ``make
    run``'s process group reaches it once, from here, and never twice (Sanic
    answers a second signal by SIGKILLing its whole process group). It gets
    SIGTERM when this process dies, whatever kills it, and so do the servers.
    """
    from core.settings import load_settings

    settings = load_settings()
    # past its own shutdown grace (and the watchdog's safety net), the service is killed
    give_up_after = settings.shutdown_grace_seconds + 30
    with running_stack(settings.var_dir, settings.redis_url, settings.mongo_url) as stack:
        child = subprocess.Popen(
            list(command), env={**os.environ, **stack.env()}, start_new_session=True,
            preexec_fn=partial(signal_on_parent_death, signal.SIGTERM, os.getpid()),
        )  # fmt: skip
        # the handler only records: it may run again inside itself (a second signal
        # between two bytecodes), so the stop is sent once, from the loop below
        heard: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, _frame: heard.append(signum))
        signal.signal(signal.SIGTERM, lambda signum, _frame: heard.append(signum))
        stop_asked: list[float] = []
        while True:
            try:
                code = child.wait(0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if heard and not stop_asked:
                stop_asked.append(time.monotonic())
                log(f"{signal.Signals(heard[0]).name}: stopping (what is queued stays in Redis)")
                child.send_signal(signal.SIGTERM)
            elif stop_asked and time.monotonic() - stop_asked[0] > give_up_after:
                log(f"{command[0]} still running {give_up_after:.0f}s after the stop; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
        if stop_asked and code in (0, -signal.SIGTERM):
            log("stopped; stopping servers")
            return 0
        log(f"{command[0]} exited with {code}; stopping servers")
        return code


def serve_until_stopped(var_dir: Path, host: str) -> int:
    """Run the servers for other processes (another network namespace, say) until SIGTERM."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stopping.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stopping.set())
    with running_stack(var_dir, host=host) as stack:
        print(json.dumps(stack.env()), flush=True)
        stopping.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    what = "install redis-server, PostgreSQL, chromium and web/'s SDKs, build FerretDB, if missing"
    sub.add_parser("setup", help=what)
    run = sub.add_parser("exec", help="start the servers, run a command, stop them")
    run.add_argument("command", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="start the servers, print their URLs, run until SIGTERM")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--var-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.verb == "setup":
            ensure_redis_server()
            postgres_bin_dir()
            ensure_ferretdb()
            ensure_chromium()
            ensure_web_packages()
            return 0
        if args.verb == "serve":
            return serve_until_stopped(args.var_dir, args.host)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("exec needs a command after --")
        return exec_with_stack(command)
    except StackError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
