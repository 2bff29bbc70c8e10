"""Admin routes over the data itself: dead letters (``service/dead_letters.py``), account
exports (``service/export.py``) and erasures (``service/erasure.py``), registered together."""

from __future__ import annotations

from typing import Any

from sanic import Sanic

from service import dead_letters, erasure, export


def add_routes(app: Sanic[Any, Any]) -> None:
    dead_letters.add_routes(app)
    export.add_routes(app)
    erasure.add_routes(app)
