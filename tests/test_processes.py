"""One `sanic ... --workers 2` command runs everything, titles it, and heals it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from functools import partial
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.stack import Stack, free_port
from tests.conftest import ServiceFactory
from tests.harness import cpu_seconds
from tests.support import Backends, Service, drained, make_event, service_env, unique, wait_for


@pytest.fixture(scope="module")
def two_workers(start_service: ServiceFactory) -> tuple[Service, Backends]:
    return start_service(workers=2)


def samples(service: Service) -> dict[str, float]:
    """Every sample of /metrics by its name and labels as written (``name{label="v"}``);
    the HELP and TYPE lines, which name every metric too, are not samples."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{service.url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def metric(service: Service, name: str) -> float:
    """A sample's value; a missing one fails (it must not pass as 0)."""
    found = samples(service)
    assert name in found, f"{name} is not a sample of /metrics: {sorted(found)}"
    return found[name]


def test_two_workers_serve_and_the_flusher_drains(two_workers: tuple[Service, Backends]) -> None:
    service, backends = two_workers
    account = unique("two")
    wait_for(lambda: len(service.pids_titled("http worker")) == 2, 20, what="both workers up")
    workers = service.pids_titled("http worker")
    cpu_before = {pid: cpu_seconds([pid]) for pid in workers}
    with httpx.Client(base_url=service.url) as client:
        for i in range(300):  # a new connection each: the kernel spreads them over both
            batch = [make_event(account, i * 10 + j) for j in range(10)]
            response = client.post("/events", json=batch, headers={"connection": "close"})
            assert response.status_code == 202
    wait_for(drained(backends, account, 3000), what="3000 events stored")
    busy = {pid: cpu_seconds([pid]) - before for pid, before in cpu_before.items()}
    assert len(busy) == 2 and all(spent > 0.05 for spent in busy.values()), busy
    assert metric(service, "events_accepted_total") >= 3000
    assert metric(service, "events_stored_total") >= 3000
    assert metric(service, "flush_batch_events_count") >= 1
    assert metric(service, 'queue_depth_events{partition="0"}') == 0


def test_every_process_has_a_recognisable_title(two_workers: tuple[Service, Backends]) -> None:
    service, _ = two_workers
    titles = sorted(service.children().values())
    assert titles.count("events-service: http worker") == 2, titles
    assert titles.count("events-service: flusher") == 1, titles
    assert titles.count("events-service: main") == 0  # the main process is the parent
    assert titles.count("events-service: rollups") == 1, titles


@pytest.mark.parametrize("role", ["http worker", "flusher", "rollups"])
def test_a_sigkilled_process_is_restarted_logged_and_counted(
    two_workers: tuple[Service, Backends], role: str
) -> None:
    service, backends = two_workers
    label = "http" if role == "http worker" else role
    restarts_before = metric(service, f'process_restarts{{process="{label}"}}')
    before = service.pids_titled(role)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            len(service.pids_titled(role)) == len(before)
            and victim not in service.pids_titled(role)
        ),
        20,
        what=f"a new {role}",
    )
    wait_for(service.is_ready, 20)
    assert f"pid {victim}) died" in service.log_tail(20000)
    wait_for(lambda: metric(service, f'process_restarts{{process="{label}"}}')
             == restarts_before + 1, 10, what="the restart to be counted")  # fmt: skip
    account = unique("after_restart")
    assert service.post([make_event(account, 1)]).status_code == 202
    wait_for(drained(backends, account, 1), what="the event stored after the restart")


def test_health_ready_metrics_and_openapi(two_workers: tuple[Service, Backends]) -> None:
    service, _ = two_workers
    assert httpx.get(f"{service.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{service.url}/ready").json() == {
        "status": "ready", "redis": True, "mongodb": True,
    }  # fmt: skip
    bad = httpx.post(
        f"{service.url}/events", content=b"[", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    found = samples(service)
    assert found['ingest_requests_rejected_total{reason="invalid_json"}'] >= 1
    for name in ("events_accepted_total", "flush_seconds_count", "redis_up",
                 'queue_depth_events{partition="0"}', 'dead_letter_entries{partition="0"}',
                 'rollup_dirty_accounts{partition="0"}',
                 'process_restarts{process="http"}', 'process_restarts{process="flusher"}',
                 'process_restarts{process="rollups"}'):  # fmt: skip
        assert found.get(name, -1) >= 0, f"no sample {name}: {sorted(found)}"
    assert found["redis_up"] == 1
    spec = httpx.get(f"{service.url}/docs/openapi.json").json()
    assert {"/events", "/summary/{account_id}", "/summary"} <= set(spec["paths"])


def test_every_process_logs_in_one_format_naming_itself(
    two_workers: tuple[Service, Backends],
) -> None:
    service, _ = two_workers
    log = service.log_tail(200_000)
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) "
                      r"\[(\w+) (\d+)\] ([\w.]+): ", re.MULTILINE)  # fmt: skip
    roles = {m.group(2) for m in line.finditer(log)}
    assert {"rollups", "flusher"} <= roles, roles
    assert re.search(r"\[rollups \d+\] (rollups|core)\.", log), "the rollups process logs"


def serve(stack: Stack, tmp_path: Path) -> Service:
    """`make run`'s entry point (scripts.serve) with PORT, HOST and WORKERS=2 set."""
    port = free_port()
    env = service_env(stack.redis_url, stack.mongo_url, tmp_path, port=port, workers=2,
                      host="127.0.0.1")  # fmt: skip
    return Service(env, workers=2, port=port, by_settings=True)


def stopped_cleanly(service: Service) -> None:
    """SIGTERM: Sanic's own shutdown ends every process (Service.stop checks that none is
    left), exit 0, without the safety net."""
    code = service.stop(60)
    log = service.log_tail()
    assert "still running after the shutdown grace" not in log, log
    assert code == 0, log


def test_host_port_and_workers_come_from_the_settings(stack: Stack, tmp_path: Path) -> None:
    """`make run` serves through scripts.serve: PORT, HOST and WORKERS have one source."""
    service = serve(stack, tmp_path)
    service.start(tmp_path, ready_path="/health")
    try:

        def http_workers() -> int:
            out = subprocess.run(["ps", "-eo", "ppid=,args="], capture_output=True, text=True)
            assert service.proc is not None
            return sum(1 for line in out.stdout.splitlines()
                       if line.split(None, 1)[0] == str(service.proc.pid)
                       and line.endswith("events-service: http worker"))  # fmt: skip

        wait_for(lambda: http_workers() == 2, 30, what="WORKERS=2 HTTP workers")
    finally:
        stopped_cleanly(service)


def test_sigterm_while_starting_stops_everything_cleanly(stack: Stack, tmp_path: Path) -> None:
    """A SIGTERM as soon as the first worker answers (Sanic's manager may still be waiting
    for the others' start-up acks, where it used to loop for good) ends the service
    through Sanic's own shutdown: exit 0, no process left, not the safety net."""
    for _ in range(3):
        service = serve(stack, tmp_path)
        service.start(tmp_path, wait=False)
        try:
            wait_for(partial(service.is_ready, "/health"), 60, 0.02, "the first worker")
        finally:
            stopped_cleanly(service)


def test_roles_split_ingest_and_background_work_across_hosts(
    start_service: ServiceFactory,
) -> None:
    """An HTTP-only host accepts; a flusher + rollups host (no API) stores and rolls up."""
    front, backends = start_service(roles="http")
    back, _ = start_service(roles="flusher,rollups", mongo_db=backends.db_name,
                            stream_key=backends.stream)  # fmt: skip
    assert front.pids_titled("flusher") == [] and front.pids_titled("rollups") == []
    wait_for(lambda: len(back.pids_titled("flusher")) == 1 and len(back.pids_titled("rollups"))
             == 1, 20, what="the back host's processes")  # fmt: skip
    assert httpx.post(f"{back.url}/events", json=[]).status_code == 404  # no API there
    assert httpx.get(f"{back.url}/health").status_code == 200
    account = unique("roles")
    assert front.post([make_event(account, i) for i in range(20)]).status_code == 202
    wait_for(drained(backends, account, 20), what="stored by the other host's flusher")
    assert httpx.get(f"{front.url}/summary/{account}").json()["total"] == 20
