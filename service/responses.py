"""JSON responses, written as bytes by msgspec (see scripts/bench_json.py)."""

from __future__ import annotations

from typing import Any

import msgspec
from sanic import HTTPResponse

_encode = msgspec.json.Encoder().encode


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> HTTPResponse:
    return HTTPResponse(
        _encode(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(
    status: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> HTTPResponse:
    return json_response({"error": error, "message": message, **extra}, status, headers)
