"""What the operator sees of HTTP traffic: answers by route and status, their latency,
every process's memory, and an access log that never prints a key."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServiceFactory
from tests.support import make_event, unique, wait_for


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels), parsed (not searched as text)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[s.name, labels] = out.get((s.name, labels), 0.0) + s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_answers_are_counted_by_route_and_status_and_timed(
    start_service: ServiceFactory,
) -> None:
    service, _ = start_service(access_log="true")
    account = unique("ops")
    secret = unique("secret_key_value")
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for n in range(7):
            assert client.post("/events", json=[make_event(account, n)]).status_code == 202
        for _ in range(3):
            assert client.post("/events", content=b"[", headers={
                "content-type": "application/json"}).status_code == 400  # fmt: skip
        assert client.get(f"/summary/{account}").status_code == 200
        assert client.get("/no/such/path").status_code == 404
        assert (
            client.get("/summary/x", params={"top": "9" * 5000, "key": secret}).status_code == 400
        )
        erased = client.delete(f"/accounts/{account}/users/{secret}_user", params={"wait": "0"})
        assert erased.status_code in (200, 202), erased.text

    expected = {("post_events", "202"): 7, ("post_events", "400"): 3, ("summary", "200"): 1,
                ("unmatched", "404"): 1}  # fmt: skip

    def counted() -> bool:
        found = samples(service.url)
        return all(value(found, "http_requests_total", route=route, status=status) == n
                   for (route, status), n in expected.items())  # fmt: skip

    wait_for(counted, 15, 0.2, "the answers in /metrics")
    found = samples(service.url)
    assert value(found, "http_request_duration_seconds_count", route="post_events") == 10
    assert value(found, "http_request_duration_seconds_bucket", route="post_events",
                 le="+Inf") == 10  # fmt: skip
    assert 0 < value(found, "http_request_duration_seconds_sum", route="post_events") < 10
    # every process reports its memory
    for role in ("http", "flusher", "rollups", "main"):

        def reported(role: str = role) -> bool:
            return value(samples(service.url), "process_rss_bytes", role=role) > 10 * 2**20

        wait_for(reported, 15, 0.5, f"the {role} process's memory")
    # the access log: one line per answer, paths without their query strings
    wait_for(lambda: "POST /events 202" in service.log_tail(10**6), 10, what="access log")
    log = service.log_tail(10**6)
    assert "GET /summary/x 400" in log and secret not in log
    assert "DELETE /accounts/<account:str>/users/<user_id:str>" in log
