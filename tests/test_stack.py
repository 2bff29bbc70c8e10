"""The embedded stack as `make run` starts it: from the default, relative VAR_DIR."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import redis

from scripts.stack import running_stack


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
