"""Schemathesis against the service's own OpenAPI document: no input makes a 5xx.

Schemathesis generates requests from the published schema (valid and, through
its negative mode, invalid ones); every answer must be a JSON 2xx/4xx (503 only
as load shedding), with the error named in its body. That refusals store
nothing is checked case by case in test_validation.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.support import Backends, Service

# negative generation needs something to break: only POST /events takes input
OPERATIONS = [
    ("/events", "POST", GenerationMode.POSITIVE),
    ("/events", "POST", GenerationMode.NEGATIVE),
    ("/health", "GET", GenerationMode.POSITIVE),
    ("/ready", "GET", GenerationMode.POSITIVE),
]


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS)
def test_no_generated_request_makes_a_server_error(
    service: tuple[Service, Backends], path: str, method: str, mode: GenerationMode
) -> None:
    svc, _ = service
    schema = schemathesis.openapi.from_url(f"{svc.url}/docs/openapi.json")
    operation = schema[path][method]
    statuses: set[int] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=svc.url, timeout=10)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500 or response.status_code == 503, response.text
        statuses.add(response.status_code)
        if response.status_code >= 400:
            assert response.headers["content-type"][0].startswith("application/json")
            assert "error" in response.json()

    check()
    assert statuses, "schemathesis generated no request"
