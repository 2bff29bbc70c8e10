"""No input makes a 5xx: schemathesis over every route, and raw bytes at POST /events.

Schemathesis generates requests from the published OpenAPI document (valid
and, through its negative mode, invalid ones) for every operation; every
answer must be a JSON 2xx/4xx (503 only as load shedding), with the error
named in its body. Hypothesis then throws what a schema cannot describe at
POST /events: arbitrary bytes, deep nesting, odd encodings. That refusals
store nothing is checked case by case in test_validation.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.support import Backends, Service

# negative generation needs something to break: every operation that takes input
OPERATIONS = [
    ("/events", "POST", GenerationMode.POSITIVE),
    ("/events", "POST", GenerationMode.NEGATIVE),
    ("/summary/{account_id}", "GET", GenerationMode.POSITIVE),
    ("/summary/{account_id}", "GET", GenerationMode.NEGATIVE),
    ("/summary", "GET", GenerationMode.POSITIVE),
    ("/summary", "GET", GenerationMode.NEGATIVE),
    ("/timeseries/{account_id}", "GET", GenerationMode.POSITIVE),
    ("/timeseries/{account_id}", "GET", GenerationMode.NEGATIVE),
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


def nest(depth: int, shape: str) -> bytes:
    opens = {"object": '{"a":', "array": "[", "mixed": '{"a":['}[shape]
    closes = {"object": "}", "array": "]", "mixed": "]}"}[shape]
    return (opens * depth + "1" + closes * depth).encode()


event_prefix = b'[{"event_id":"e1","account_id":"fuzz","user_id":"u","type":"login",'
bodies = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda d, s: event_prefix + b'"timestamp":"2026-01-01T00:00:00Z","metadata":'
              + nest(d, s) + b"}]", st.integers(1, 20_000),
              st.sampled_from(["object", "array", "mixed"])),
    st.text(max_size=300).map(lambda t: t.encode("utf-16")),
    st.text(max_size=300).map(lambda t: t.encode("latin-1", "replace")),
    st.text(max_size=300).map(lambda t: event_prefix + t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\xef\xbb\xbf[]", b"\xff\xfe[\x00]\x00", b"[1e999999]",
                     b'[{"timestamp": "2026-13-45T99:99:99Z"}]', b"[" * 100_000]),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, content_type=st.sampled_from(["application/json",
                                                  "application/json; charset=latin-1",
                                                  "application/json; charset=utf-16"]))  # fmt: skip
def test_any_bytes_at_post_events_get_a_json_4xx_never_a_5xx(
    service: tuple[Service, Backends], body: bytes, content_type: str
) -> None:
    svc, _ = service
    response = httpx.post(f"{svc.url}/events", content=body,
                          headers={"content-type": content_type}, timeout=30)  # fmt: skip
    assert 400 <= response.status_code < 500 or response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code >= 400:
        assert response.json()["error"]


def test_the_spec_keeps_the_ingest_body_schema(service: tuple[Service, Backends]) -> None:
    """The ingest handler is registered unwrapped (service/app.py ``unwrapped``): its
    definition must still describe the body schemathesis generates from."""
    svc, _ = service
    spec = httpx.get(f"{svc.url}/docs/openapi.json").json()
    body = spec["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]
    forms = body["schema"].get("oneOf") or body["schema"].get("anyOf") or [body["schema"]]
    assert any(f.get("type") == "array" and f.get("maxItems") == 1000 for f in forms), body
