"""Every HTTP answer counted and timed: by route and status, and an optional access log.

``http_requests_total{route, status}`` and ``http_request_duration_seconds{route}``
(route: the route's name, ``unmatched`` for a path no route has; so both stay
bounded whatever clients send). Each worker counts in plain memory and adds the
counts to prometheus-client's (file-backed, locked) metrics once a second: doing
that per request cost a few percent of a one-event request.

The access log (``ACCESS_LOG=true``) writes one line per answer with the path
but never the query string (``/stream?key=…`` carries a key), and the route's
pattern instead of a path that names a user (erasure).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Histogram
from sanic import Request
from sanic.response import BaseHTTPResponse

from core import metrics, tasks

log = logging.getLogger("service.access")

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUESTS = Counter("http_requests_total", "HTTP answers, by route and status", ["route", "status"])
DURATION = Histogram("http_request_duration_seconds", "From the request's head to its answer",
                     ["route"], buckets=BUCKETS)  # fmt: skip
FLUSH_SECONDS = 1.0
PERSONAL_PATHS = frozenset({"erase_user"})  # routes whose path names a user


class RequestStats:
    """One worker's counts since the last flush."""

    def __init__(self, access_log: bool) -> None:
        self.access_log = access_log
        self._answers: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = {}
        self._sums: defaultdict[str, float] = defaultdict(float)
        self._task: asyncio.Task[None] | None = None

    def record(self, request: Request, response: BaseHTTPResponse) -> None:
        started = getattr(request.stream, "perft0", None)
        seconds = time.perf_counter() - started if started else 0.0
        route = request.route.name.rsplit(".", 1)[-1] if request.route else "unmatched"
        self._answers[route, response.status] += 1
        buckets = self._buckets.get(route)
        if buckets is None:
            buckets = self._buckets[route] = [0] * (len(BUCKETS) + 1)
        buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sums[route] += seconds
        if self.access_log:
            # a user id is personal data: a path that holds one is logged as its pattern
            path = request.route.path if route in PERSONAL_PATHS and request.route else request.path
            log.info("%s /%s %d %.1fms %s", request.method, path.lstrip("/"), response.status,
                     seconds * 1000, request.remote_addr or request.ip)  # fmt: skip

    def flush(self) -> None:
        answers, self._answers = self._answers, defaultdict(int)
        buckets, self._buckets = self._buckets, {}
        sums, self._sums = self._sums, defaultdict(float)
        for (route, status), n in answers.items():
            REQUESTS.labels(route, str(status)).inc(n)
        for route, counts in buckets.items():
            child: Any = DURATION.labels(route)
            # prometheus-client has no "observe n times": its histogram child keeps one
            # counter per bucket (non-cumulative) and the sum, as these attributes
            for i, n in enumerate(counts):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(sums[route])

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._every_second())

    async def stop(self) -> None:
        if self._task:
            await tasks.stop([self._task])
        self.flush()

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()
            metrics.report_rss("http")
