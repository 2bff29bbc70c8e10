"""No input makes a 5xx: schemathesis over every route, hypothesis over every route's query
string and the SDK routes' bodies, and raw bytes at POST /events.

Schemathesis generates requests from the published OpenAPI document (valid
and, through its negative mode, invalid ones) for every operation it lists,
SDK, config and admin routes included; every answer must be a JSON 2xx/4xx
(503 only as load shedding), with the error named in its body. What a schema
does not describe is thrown at the routes directly: arbitrary query strings
(every parameter any route reads, numbers past Python's 4,300-digit ``int()``
limit, Unicode digits) on every route, arbitrary bodies and encodings at the
SDK routes and POST /events, and bad accounts and filters at GET /stream,
whose valid requests never end. That refusals store nothing is checked case
by case in test_validation.py and test_sdks.py.
"""

from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from tests.support import Backends, Service

# a valid request streams for as long as the client listens: fuzzed below instead
NEVER_ENDING = {("/stream/{account_id}", "GET")}
# among the operations the document must list (so that schemathesis fuzzes them)
SDK_OPERATIONS = {
    *(("/v1/" + p, "POST") for p in ("batch", "b", "import", "t", "p", "i", "g", "a", "s",
                                      "track", "page", "identify", "group", "alias", "screen")),
    ("/beacon/v1/batch", "POST"), ("/batch", "POST"), ("/capture", "POST"), ("/e", "POST"),
    ("/i/v0/e", "POST"), ("/i/v0/ai/batch", "POST"), ("/flags", "POST"), ("/decide", "POST"),
    ("/v1/projects/{write_key}/settings", "GET"), ("/sourceConfig", "GET"),
    ("/array/{token}/config", "GET"), ("/array/{token}/config.js", "GET"),
    ("/admin/keys", "GET"), ("/admin/keys", "POST"),
}  # fmt: skip
READ_OPERATIONS = {("/summary/{account_id}", "GET"), ("/summary", "GET"),
                   ("/timeseries/{account_id}", "GET"), ("/events", "POST")}  # fmt: skip


def check_answer(status: int, content_type: str, body: bytes) -> None:
    """A 2xx or 4xx (503 only as load shedding); a refusal is JSON naming its error."""
    assert status < 500 or status == 503, body[:500]
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type)
        assert json.loads(body)["error"], body[:500]


def fuzz(operation: Any, mode: GenerationMode, base_url: str) -> set[int]:
    """The statuses of the requests schemathesis generated for one operation."""
    statuses: set[int] = set()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=10)
        case.validate_response(response, checks=[not_a_server_error])
        check_answer(response.status_code, response.headers.get("content-type", [""])[0],
                     response.content)  # fmt: skip
        statuses.add(response.status_code)

    check()
    return statuses


def breakable(operation: Any) -> bool:
    """Whether negative generation has something to get wrong: a body, a parameter more
    specific than any string, or a required one it can leave out (a path's cannot be)."""
    return bool(operation.body) or any(
        p.definition.get("schema") != {"type": "string"}
        or (p.is_required and p.definition.get("in") != "path")
        for p in operation.iter_parameters()
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_makes_a_server_error(
    service: tuple[Service, Backends], mode: GenerationMode
) -> None:
    svc, _ = service
    schema = schemathesis.openapi.from_url(f"{svc.url}/docs/openapi.json")
    fuzzed: set[tuple[str, str]] = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document is valid
        operation = result.ok()
        name = (operation.path, operation.method.upper())
        if name in NEVER_ENDING or (mode == GenerationMode.NEGATIVE and not breakable(operation)):
            continue
        assert fuzz(operation, mode, svc.url), f"schemathesis generated no request for {name}"
        fuzzed.add(name)
    expected = (
        SDK_OPERATIONS | READ_OPERATIONS if mode == GenerationMode.POSITIVE else READ_OPERATIONS
    )
    assert expected <= fuzzed, sorted(expected - fuzzed)


def test_every_query_parameter_a_read_route_takes_is_in_the_document(
    service: tuple[Service, Backends],
) -> None:
    """Schemathesis can only fuzz the parameters the document declares."""
    svc, _ = service
    paths = httpx.get(f"{svc.url}/docs/openapi.json").json()["paths"]

    def query(path: str) -> dict[str, Any]:
        params = paths[path]["get"]["parameters"]
        return {p["name"]: p["schema"] for p in params if p["in"] == "query"}

    assert query("/summary/{account_id}")["top"] == {"type": "integer", "format": "int32",
                                                     "minimum": 1, "maximum": 100}  # fmt: skip
    assert set(query("/summary")) == {"account_id", "window", "top"}
    assert set(query("/timeseries/{account_id}")) == {"window", "step"}
    assert query("/timeseries/{account_id}")["step"]["enum"] == ["1m", "5m", "15m", "1h", "6h",
                                                                 "1d"]  # fmt: skip
    assert set(query("/stream/{account_id}")) == {"types", "users", "key"}


# every query parameter some route reads, and what browser SDKs add to their URLs
PARAMETERS = ["top", "window", "step", "account_id", "account", "key", "types", "users",
              "writeKey", "compression", "ver", "ip", "_", "v", "config"]  # fmt: skip
query_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["9" * 4301, "0" * 5000 + "5", "1" * 4300, "²", "٣", "1e2", "5.0", " 5",
                     "+5", "0x10", "NaN", "", "gzip-js", "base64", "24h", "1m", "fuzz_acc"]),
)  # fmt: skip


def raw_query(raw: bytes) -> str:
    """Bytes as a query string: printable ASCII as it is (stray ``%``, ``&``, ``=`` included),
    anything else percent-escaped (invalid UTF-8 stays invalid)."""
    return "".join(chr(b) if 0x21 <= b < 0x7F and b != ord("#") else f"%{b:02X}" for b in raw)


query_strings = st.one_of(
    st.dictionaries(
        st.sampled_from(PARAMETERS) | st.text(max_size=4), query_values, max_size=4
    ).map(lambda q: str(httpx.QueryParams(q))),
    st.binary(max_size=60).map(raw_query),
    st.sampled_from(["top=%FF%FE", "top", "=", "&&&", "top=1&top=2", "window=%00", "%", "top=%"]),
)
GET_ROUTES = ["/summary/fuzz_acc", "/summary", "/timeseries/fuzz_acc", "/dashboard", "/health",
              "/ready", "/metrics", "/admin/keys", "/v1/projects/fuzz_acc/settings",
              "/sourceConfig/", "/array/fuzz_acc/config", "/array/fuzz_acc/config.js", "/flags/",
              "/decide/"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(GET_ROUTES), query=query_strings)
@example(path="/summary/fuzz_acc", query="top=" + "9" * 4301)  # int() refuses: was a 500
@example(path="/summary", query="account_id=fuzz_acc&top=" + "0" * 5000 + "5")  # was a 500
def test_any_query_string_on_any_route_is_an_answer_or_a_4xx(
    service: tuple[Service, Backends], path: str, query: str
) -> None:
    svc, _ = service
    response = httpx.get(f"{svc.url}{path}?{query}", timeout=10)
    check_answer(response.status_code, response.headers.get("content-type", ""),
                 response.content)  # fmt: skip


SDK_POSTS = ["/v1/batch", "/v1/b", "/v1/import", "/beacon/v1/batch", "/v1/t", "/v1/p", "/v1/i",
             "/v1/g", "/v1/a", "/v1/s", "/v1/track", "/v1/page", "/v1/identify", "/v1/group",
             "/v1/alias", "/v1/screen", "/batch/", "/capture/", "/e/", "/i/v0/e/",
             "/i/v0/ai/batch/", "/flags/", "/decide/"]  # fmt: skip
json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=8,
)  # fmt: skip
message = st.fixed_dictionaries(
    {},
    optional={"type": st.sampled_from(["track", "page", "identify", "x"]) | json_value,
              "messageId": st.text(max_size=8), "uuid": st.text(max_size=8),
              "userId": st.text(max_size=8), "distinct_id": st.text(max_size=8),
              "event": st.text(max_size=12), "timestamp": st.text(max_size=25) | json_value,
              "properties": json_value},
)  # fmt: skip
envelope = st.fixed_dictionaries(
    {},
    optional={"batch": st.lists(message, max_size=3) | json_value, "writeKey": json_value,
              "api_key": st.sampled_from(["fuzz_acc", "", "bad key"]) | json_value,
              "sentAt": json_value, "sent_at": json_value, "event": json_value,
              "uuid": json_value, "distinct_id": json_value, "token": json_value},
)  # fmt: skip
sdk_bodies = st.one_of(
    st.binary(max_size=300),
    envelope.map(lambda e: json.dumps(e).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(SDK_POSTS),
    query=query_strings,
    body=sdk_bodies,
    encoding=st.sampled_from(["", "gzip", "gzip-as-text", "form"]),
    content_type=st.sampled_from(["application/json", "text/plain", "", "image/png",
                                  "application/x-www-form-urlencoded"]),
)  # fmt: skip
def test_any_body_and_query_at_the_sdk_routes_get_an_answer_or_a_4xx(
    service: tuple[Service, Backends],
    path: str,
    query: str,
    body: bytes,
    encoding: str,
    content_type: str,
) -> None:
    svc, _ = service
    headers = {"content-type": content_type} if content_type else {}
    if encoding == "gzip":
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    elif encoding == "gzip-as-text":  # posthog-js: gzip sent as text/plain, recognised by its bytes
        body = gzip.compress(body)
    elif encoding == "form":
        body = b"data=" + body
    response = httpx.post(f"{svc.url}{path}?{query}", content=body, headers=headers, timeout=10)
    check_answer(response.status_code, response.headers.get("content-type", ""),
                 response.content)  # fmt: skip


bad_accounts = st.one_of(
    st.text(min_size=65, max_size=80, alphabet="abc"),
    st.text(min_size=1, max_size=10).filter(
        lambda a: any(not (c.isascii() and (c.isalnum() or c in "_.:-")) for c in a)
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(account=bad_accounts, query=query_strings)
def test_the_stream_refuses_a_bad_account_whatever_the_query(
    service: tuple[Service, Backends], account: str, query: str
) -> None:
    svc, _ = service
    url = f"{svc.url}/stream/{quote(account, safe='')}?{query}"
    with httpx.stream("GET", url, timeout=10) as response:  # a 200 would never end: not read
        status, content_type = response.status_code, response.headers.get("content-type", "")
        body = response.read() if status != 200 else b""
    assert 400 <= status < 500 or status == 404, (account, query, status)
    check_answer(status, content_type, body)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["types", "users"]), count=st.integers(101, 400),
       value=st.text(alphabet="abc_", min_size=1, max_size=5))  # fmt: skip
def test_the_stream_refuses_too_many_filter_values(
    service: tuple[Service, Backends], name: str, count: int, value: str
) -> None:
    svc, _ = service
    values = ",".join(f"{value}{i}" for i in range(count))
    with httpx.stream("GET", f"{svc.url}/stream/fuzz_acc", params={name: values},
                      timeout=10) as response:  # fmt: skip
        status = response.status_code
        body = response.read() if status != 200 else b""
    assert status == 400, (name, count)
    check_answer(status, response.headers["content-type"], body)


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
