"""The embedded stack as `make run` starts it: from the default, relative VAR_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import redis

from scripts.stack import (
    PostgresServer,
    StackError,
    _as_postgres_user,
    process_identity,
    running_stack,
    scratch_dir,
)
from tests.harness import wait_for


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A working directory the postgres user can reach (pytest's own are 0700, which
    makes the stack move PostgreSQL's data to an absolute temp dir and hides the case)."""
    path = Path(tempfile.mkdtemp(prefix="events-service-checkout-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_relative_var_dir_starts_every_server(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(checkout)
    with running_stack(Path("var")) as stack:
        assert stack.postgres is not None
        assert stack.postgres.data_dir == checkout / "var" / "postgres"
        assert redis.Redis.from_url(stack.redis_url).ping()
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            stack.mongo_url, serverSelectionTimeoutMS=10_000
        )
        with client:
            client["relative_var_dir"]["probe"].insert_one({"_id": 1})
            assert client["relative_var_dir"]["probe"].find_one({"_id": 1}) == {"_id": 1}


@pytest.fixture
def var_dir() -> Iterator[Path]:
    with scratch_dir("events-service-var-") as path:
        yield path / "var"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_a_var_dir_postgres_cannot_reach_is_refused_with_what_to_do(var_dir: Path) -> None:
    private = var_dir.parent / "private"
    private.mkdir(mode=0o700)
    temp_dirs_before = set(Path(tempfile.gettempdir()).glob("events-service-postgres-*"))
    with pytest.raises(StackError) as refused, running_stack(private / "var"):
        pass
    message = str(refused.value)
    assert str(private) in message and "VAR_DIR" in message and "chmod o+x" in message
    # nothing put anywhere else instead
    assert set(Path(tempfile.gettempdir()).glob("events-service-postgres-*")) == temp_dirs_before
    assert not (private / "var" / "postgres" / "cluster").exists()


def stray_postgres(data_dir: Path) -> subprocess.Popen[bytes]:
    """PostgreSQL on the cluster of ``data_dir``, as an older start left it running: in a
    session of its own, no parent-death signal, no pid file of ours."""
    server = PostgresServer(data_dir=data_dir)
    proc = subprocess.Popen(_stray_command(server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    wait_for(lambda: (server.cluster / "postmaster.pid").exists(), 30, what="postgres up")
    return proc


def _stray_command(server: PostgresServer) -> list[str]:
    command = server.command()
    return [part for part in command if not part.startswith("--pdeathsig")]


def test_a_start_stops_a_server_left_running_on_its_var_dir(var_dir: Path) -> None:
    with running_stack(var_dir) as first:
        assert first.postgres is not None
        first_port = first.postgres.port
    stray = stray_postgres(var_dir / "postgres")
    try:
        with running_stack(var_dir) as second:
            assert second.postgres is not None and second.postgres.port != first_port
            assert stray.wait(30) is not None  # stopped by the start, not by us
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                second.mongo_url, serverSelectionTimeoutMS=10_000
            )
            with client:
                client["reclaim"]["probe"].insert_one({"_id": 1})
    finally:
        if stray.poll() is None:
            stray.kill()


def test_a_stale_lock_of_a_reused_pid_does_not_block_a_start(var_dir: Path) -> None:
    with running_stack(var_dir):
        pass
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        lock = var_dir / "postgres" / "cluster" / "postmaster.pid"
        lock.write_text(f"{unrelated.pid}\n{var_dir / 'postgres' / 'cluster'}\n")
        with running_stack(var_dir) as stack:
            assert redis.Redis.from_url(stack.redis_url).ping()
        assert unrelated.poll() is None, "an unrelated process must be left alone"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_lock_of_a_killed_postmaster_never_collected_does_not_block_a_start(
    var_dir: Path,
) -> None:
    """A postmaster SIGKILLed with its launcher (a power cut) stays a zombie until
    something collects it, and PostgreSQL takes a zombie's pid for a live server
    ("lock file already exists"). Here the zombie is never collected: the start waits
    for it a while, then clears the lock itself."""
    with running_stack(var_dir):
        pass
    # a process of the postgres user (as a postmaster is) that exits at once and is not
    # waited for: a zombie of ours
    dead = subprocess.Popen([*_as_postgres_user(), "true"])
    try:
        wait_for(lambda: "Z" in Path(f"/proc/{dead.pid}/stat").read_text().rsplit(")", 1)[1][:3],
                 10, what="a zombie")  # fmt: skip
        lock = var_dir / "postgres" / "cluster" / "postmaster.pid"
        lock.write_text(f"{dead.pid}\n{var_dir / 'postgres' / 'cluster'}\n")
        with running_stack(var_dir) as stack:
            assert stack.mongo_url
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                stack.mongo_url, serverSelectionTimeoutMS=10_000
            )
            with client:
                client["zombie"]["probe"].insert_one({"_id": 1})
    finally:
        dead.wait()


def test_a_server_whose_launcher_still_runs_is_not_taken_over(var_dir: Path) -> None:
    with running_stack(var_dir) as first:
        assert first.redis is not None and first.redis.proc is not None
        pidfile = first.redis.pidfile
        pid, identity, _starter, _ = pidfile.read_text().split()
        # as if another live process had started it: a second `make run` on one VAR_DIR
        other = subprocess.Popen(["sleep", "60"])
        try:
            pidfile.write_text(f"{pid} {identity} {other.pid} {process_identity(other.pid)}\n")
            with pytest.raises(StackError, match="in use"), running_stack(var_dir):
                pass
            assert first.redis.proc.poll() is None, "the running server was left alone"
        finally:
            other.kill()
            other.wait()
