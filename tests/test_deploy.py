"""docker/ validated without a Docker engine (``make test-deploy``; scripts/deploy_check.py).

The real files must pass, and every rule is shown to fire: each case breaks a
copy of the real file in one way and expects the problem that causes.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from scripts import deploy_check as dc
from scripts.stack import ROOT, free_port

HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def dockerfile_report() -> dict[str, Any]:
    return dc.dockerfile_report()


@pytest.fixture(scope="module")
def compose_report() -> dict[str, Any]:
    return dc.compose_report()


def test_the_deploy_files_pass() -> None:
    assert dc.all_problems() == []


def test_cli_reports_ok() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.deploy_check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": ok")


# ------------------------------------------------------------------ Dockerfile


def dockerfile_problems(tmp_path: Path, old: str, new: str) -> list[str]:
    text = dc.DOCKERFILE.read_text()
    assert old in text, f"the Dockerfile changed: {old!r} is gone"
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new, 1))
    return dc.dockerfile_problems(dc.dockerfile_report(path, ROOT))


USER = "USER 10001:10001\n"
HOST = "    HOST=0.0.0.0 \\\n"
LAST_RUN = "RUN python -m compileall -q /app\n"
HEALTH = (
    "HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \\\n"
    '    CMD ["python", "/app/healthcheck.py"]\n'
)
SERVE = 'CMD ["python", "-m", "scripts.serve"]\n'
BASE = "ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm\n"
VENV = "COPY --from=build /opt/venv /opt/venv\n"

BROKEN_DOCKERFILES = {
    "no USER": (USER, "", "has no USER"),
    "USER root": (USER, "USER root\n", "runs as root"),
    "USER 0": (USER, "USER 0:0\n", "runs as root"),
    "unpinned base": (BASE, "ARG PYTHON_IMAGE=python:3.11-slim-bookworm\n", "not pinned"),
    "latest base": (BASE, "ARG PYTHON_IMAGE=python:latest\n", "not pinned"),
    "apt in final": (
        LAST_RUN,
        "RUN apt-get update && apt-get install -y gcc\n",
        "installs packages",
    ),
    "compiler in final": (LAST_RUN, "RUN apt-get install -y gcc\n", "build tool 'gcc'"),
    "pip in final": (LAST_RUN, "RUN python -m pip install ujson\n", "installs packages"),
    "tools copied": (VENV, VENV + "COPY --from=build /usr/bin/gcc /usr/bin/\n", "only the runtime"),
    "other base": (
        "FROM ${PYTHON_IMAGE} AS runtime\n",
        "FROM python:3.11.14-bookworm AS runtime\n",
        "the final base",
    ),
    "no HEALTHCHECK": (HEALTH, "", "no HEALTHCHECK"),
    "HEALTHCHECK shell": (
        HEALTH,
        "HEALTHCHECK --retries=3 CMD python /app/healthcheck.py\n",
        "HEALTHCHECK must be a CMD in exec form",
    ),
    "HEALTHCHECK elsewhere": (HEALTH, 'HEALTHCHECK CMD ["true"]\n', "probe of GET /health"),
    "CMD shell": (SERVE, "CMD python -m scripts.serve\n", "JSONArgsRecommended"),
    "CMD other": (SERVE, 'CMD ["sanic", "service.app:create_app"]\n', "CMD must be"),
    "ENTRYPOINT": (SERVE, 'ENTRYPOINT ["tini", "--"]\n' + SERVE, "ENTRYPOINT"),
    "loopback": (HOST, "", "HOST=0.0.0.0"),
    "no EXPOSE": ("EXPOSE 8000\n", "", "EXPOSE 8000"),
    "package missing": ("COPY rollups/ rollups/\n", "", "does not copy package 'rollups'"),
    "whole context": ("COPY core/ core/\n", "COPY . .\n", "whole build context"),
    "missing source": ("COPY core/ core/\n", "COPY kore/ core/\n", "COPY kore/ matches nothing"),
    "ignored source": (
        "COPY docker/healthcheck.py healthcheck.py\n",
        "COPY tests/harness.py healthcheck.py\n",
        "COPY tests/harness.py matches nothing",
    ),
    "lint: casing": ("AS build\n", "as build\n", "FromAsCasing"),
    "lint: undefined": ("/opt/venv/bin:$PATH", "/opt/venv/bin:$PTH", "UndefinedVar"),
    "syntax": (SERVE, SERVE + "RUNN true\n", "does not build"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DOCKERFILES))
def test_dockerfile_rule_fires(tmp_path: Path, case: str) -> None:
    old, new, expected = BROKEN_DOCKERFILES[case]
    problems = dockerfile_problems(tmp_path, old, new)
    assert any(expected in p for p in problems), problems


def test_dockerfile_needs_two_stages(dockerfile_report: dict[str, Any]) -> None:
    single = {**dockerfile_report, "stages": dockerfile_report["stages"][-1:]}
    assert any("multi-stage" in p for p in dc.dockerfile_problems(single))


def test_build_context_follows_dockerignore(dockerfile_report: dict[str, Any]) -> None:
    files = dockerfile_report["context_files"]
    assert dockerfile_report["ignore_file"].endswith(".dockerignore")
    assert "core/settings.py" in files and "service/app.py" in files
    assert "scripts/serve.py" in files and "scripts/stack.py" not in files
    assert not [f for f in files if f.startswith((".venv/", ".git/", "var/", "tests/"))]
    assert dockerfile_report["context_bytes"] < dc.CONTEXT_MAX_BYTES


def test_context_rule_fires_without_an_ignore_file(tmp_path: Path) -> None:
    # BuildKit reads <Dockerfile>.dockerignore before the context's .dockerignore
    path = tmp_path / "Dockerfile"
    path.write_text(dc.DOCKERFILE.read_text())
    (tmp_path / "Dockerfile.dockerignore").write_text("# nothing ignored\n")
    problems = dc.dockerfile_problems(dc.dockerfile_report(path, ROOT))
    assert any(p.startswith("build context holds ") for p in problems), problems[:5]


# --------------------------------------------------------------------- compose


def compose_problems(tmp_path: Path, old: str, new: str) -> list[str]:
    text = dc.COMPOSE.read_text()
    assert old in text, f"the compose file changed: {old!r} is gone"
    path = tmp_path / "compose.yaml"
    path.write_text(text.replace(old, new, 1))
    return dc.compose_problems(dc.compose_report(path))


BROKEN_COMPOSE = {
    "no AOF": ('--appendonly\n      - "yes"', '--appendonly\n      - "no"', "--appendonly yes"),
    "fsync no": ("--appendfsync\n      - always", '--appendfsync\n      - "no"', "appendfsync"),
    "eviction": ("- noeviction", "- allkeys-lru", "must be noeviction"),
    "same instance": ("INSTANCE_NAME: flusher-2", "INSTANCE_NAME: flusher-1", "more than one"),
    "no instance": ("      INSTANCE_NAME: flusher-1\n", "", "without INSTANCE_NAME"),
    "started only": ("condition: service_healthy", "condition: service_started", "service_healthy"),
    "bad role": ("ROLES: rollups", "ROLES: rollup", "ROLES must be"),
    "no rollups": ("ROLES: rollups", "ROLES: http", "with the rollups role"),
    "one http": ("ROLES: http\n", "ROLES: flusher\n", "with the http role"),
    "bad api keys": ("API_KEYS: ${API_KEYS:-}", "API_KEYS: nonsense", "API_KEYS must look like"),
    "open": ("AUTH: keys", "AUTH: open", "without API keys"),
    "no auth": ("  AUTH: keys\n", "", "listens beyond this machine"),
    "hosts disagree": (
        "      INSTANCE_NAME: flusher-2\n",
        "      INSTANCE_NAME: flusher-2\n      STREAM_KEY: other\n",
        "STREAM_KEY differ",
    ),
    "short grace": ("stop_grace_period: 30s", "stop_grace_period: 5s", "stop_grace_period 5s"),
    "unjournaled": ("mongodb://mongo:27017/?journal=true", "mongodb://mongo:27017/", "journaled"),
    "other redis": ("redis://redis:6379/0", "redis://cache:6379/0", "does not name the Redis"),
    "latest redis": ("image: redis:7.2.14", "image: redis:latest", "not pinned"),
    "mongo 6": ("image: mongo:7.0.28", "image: mongo:6.0.19", "want image mongo:7"),
    "no volume": ("- mongo-data:/data/db", "- /srv/mongo:/data/db", "no named volume at /data/db"),
    "no port": ('    ports:\n      - "8002:8000"\n', "", "publishes no port"),
    "no mongo health": (
        'test: ["CMD", "mongosh"',
        'disable: true\n      x-test: ["CMD", "mongosh"',
        "mongo: no healthcheck",
    ),
    "flusher replicas": (
        "      INSTANCE_NAME: flusher-2\n",
        "      INSTANCE_NAME: flusher-2\n    deploy:\n      replicas: 2\n",
        "replicas would share",
    ),
    "undefined volume": ("volumes:\n  mongo-data:\n", "volumes:\n", "does not load"),
    "schema": ("    restart: unless-stopped\n", "    restarts: unless-stopped\n", "does not load"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_COMPOSE))
def test_compose_rule_fires(tmp_path: Path, case: str) -> None:
    old, new, expected = BROKEN_COMPOSE[case]
    problems = compose_problems(tmp_path, old, new)
    assert any(expected in p for p in problems), problems


def test_compose_layout(compose_report: dict[str, Any]) -> None:
    services = compose_report["project"]["services"]
    roles = {n: s["environment"].get("ROLES") for n, s in services.items() if dc.is_app_service(s)}
    assert roles == {
        "http-1": "http",
        "http-2": "http",
        "flusher-1": "flusher",
        "flusher-2": "flusher",
        "rollups": "rollups",
    }
    redis = dc.redis_options(services["redis"]["command"])
    assert (redis["appendonly"], redis["appendfsync"]) == ("yes", "always")
    assert {s["build"]["context"] for n, s in services.items() if n in roles} == {str(ROOT)}


def test_durations() -> None:
    assert dc.seconds("1m30s", 0) == 90 and dc.seconds("250ms", 0) == 0.25
    assert dc.seconds(None, 10) == 10
    with pytest.raises(ValueError):
        dc.seconds("30 seconds", 0)


# ------------------------------------------------------------- lock, imports


def test_lock_rules_fire(dockerfile_report: dict[str, Any]) -> None:
    lock = dc.LOCK.read_text()
    assert dc.lock_problems(dockerfile_report, lock) == []
    pins, _ = dc.read_lock(lock)

    def without(name: str) -> str:
        return "".join(x for x in lock.splitlines(True) if not x.startswith(f"{name}=="))

    problems = dc.lock_problems(dockerfile_report, without("sanic"))
    assert any("sanic>=" in p and "not pinned" in p for p in problems), problems
    assert any("imports sanic" in p for p in problems), problems
    old = lock.replace(f"pymongo=={pins['pymongo']}", "pymongo==4.0.0")
    assert any("pymongo==4.0.0 is not" in p for p in dc.lock_problems(dockerfile_report, old))
    bad = lock + "sanic>=1\n"
    assert any("not NAME==VERSION" in p for p in dc.lock_problems(dockerfile_report, bad))


def test_lock_generation_follows_requirements() -> None:
    _, problems = dc.read_lock(dc.LOCK.read_text())
    assert problems == []
    closure = dc.runtime_closure()  # what `python -m scripts.deploy_check lock` writes
    direct = {canonicalize_name(r.name) for r in dc.runtime_requirements()}
    assert direct <= set(closure)
    assert "sanic-routing" in closure  # sanic's own requirement
    assert "pytest" not in closure  # dev extras stay out


def test_imports_under_type_checking_are_not_runtime(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "import os.path\nfrom typing import TYPE_CHECKING\nfrom . import sibling\n"
        "if TYPE_CHECKING:\n    import mypy\nelse:\n    import json\n"
        "def f():\n    from redis import asyncio\n"
    )
    assert dc.imported_modules(path) == {"os", "typing", "json", "redis"}


# ----------------------------------------------------------- the health probe


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status[0] if self.path == "/health" else 404
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def probe(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=10
    )


def test_healthcheck_probe(health_server: tuple[int, list[int]]) -> None:
    port, status = health_server
    assert probe(port).returncode == 0
    status[0] = 503
    failed = probe(port)
    assert failed.returncode == 1 and "answered 503" in failed.stderr
    refused = probe(free_port())
    assert refused.returncode == 1 and "unhealthy" in refused.stderr
