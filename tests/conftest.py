"""Fixtures: real Redis and FerretDB (or REDIS_URL / MONGO_URL), real service processes.

Each test module gets its own database and stream names, so modules never see
each other's data even on shared servers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.stack import Stack, running_stack
from tests.support import Backends, Service, service_env


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var_dir = tmp_path_factory.mktemp("stack")
    with running_stack(
        var_dir, os.environ.get("REDIS_URL", ""), os.environ.get("MONGO_URL", "")
    ) as started:
        yield started


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


ServiceFactory = Callable[..., tuple[Service, Backends]]


def _service_factory(stack: Stack, var_dir: Path) -> Iterator[ServiceFactory]:
    started: list[tuple[Service, Backends]] = []

    def start(workers: int = 1, **overrides: Any) -> tuple[Service, Backends]:
        env = service_env(stack.redis_url, stack.mongo_url, var_dir, **overrides)
        service = Service(env=env, workers=workers)
        service.start(var_dir)
        backends = Backends(stack.redis_url, stack.mongo_url, env["MONGO_DB"], env["STREAM_KEY"])
        started.append((service, backends))
        return service, backends

    yield start
    for service, backends in started:
        service.stop()
        backends.close()


@pytest.fixture(scope="module")
def start_service(stack: Stack, var_dir: Path) -> Iterator[ServiceFactory]:
    yield from _service_factory(stack, var_dir)


@pytest.fixture(scope="module")
def service(start_service: ServiceFactory) -> tuple[Service, Backends]:
    """One shared service per module (1 HTTP worker + flusher)."""
    return start_service()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """Servers this test alone controls (to stop, kill and restart them)."""
    with running_stack(tmp_path / "servers") as started:
        yield started


@pytest.fixture
def start_own_service(own_stack: Stack, tmp_path: Path) -> Iterator[ServiceFactory]:
    yield from _service_factory(own_stack, tmp_path)
