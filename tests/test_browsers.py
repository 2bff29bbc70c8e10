"""The three browser SDKs, unchanged, in a real browser (Debian's headless chromium over
the DevTools protocol) on a page of another origin, against the service (in-process,
keys on): posthog-js, Segment's analytics.js and RudderStack's JS SDK v3.

The SDKs are the npm files pinned in web/package-lock.json (``python -m scripts.stack
setup`` installs them), served with the pages of tests/browser_pages/ by a small
server in this process on its own loopback port: the page origin. No CDN is
reachable, and none is needed: every request a page makes goes to the page origin
or to the service, and the test says so.

Each SDK run has its own account and a ``write`` key made for it over /admin/keys,
which the page holds as its write key / project token. The test checks that every
event the page produced is stored exactly once (counted per type), in every body
form and transport the SDK uses (posthog-js: gzip, JSON, base64 form, sendBeacon
on page close; analytics.js: one request per call and batches; RudderStack: XHR
per call and sendBeacon batches), that the SDK's configuration calls succeed, that
nothing the page logged is an error (CORS refusals and failed requests included),
that the events show up on ``GET /stream`` (EventSource, from the page origin)
each once, that the page's write key cannot read while a read key can (and only
from an origin CORS_READ_ORIGINS names), and that the SDKs' retries after a Redis
outage (503 with Retry-After) store nothing twice.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import mimetypes
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urlencode, urlsplit

import pytest

from scripts.stack import Stack, ensure_web_packages, free_port
from tests import browser
from tests.browser import Message, Page, Request
from tests.conftest import AppFactory, Running, apps_on
from tests.support import Backends, eventually, unique

chromium, page = browser.chromium, browser.page  # the fixtures, used by name

PAGES = Path(__file__).parent / "browser_pages"
# exactly the files the research note recommends for a self-hosted, quiet page
SDK_FILES = {
    # every extension bundled: it never loads another script (no /static/*.js)
    "/sdk/posthog.js": "posthog-js/dist/array.full.no-external.js",
    # window.AnalyticsNext; its lazy chunks sit beside it, none is asked for here
    "/sdk/segment/": "@segment/analytics-next/dist/umd/",
    # every plugin bundled (the default build fetches its plugins from a CDN)
    "/sdk/rudderstack.js": "@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js",
}
BOOT = "boot-browsers-admin"
ADMIN = {"x-api-key": BOOT}

POSTHOG = Counter(pageview=1, signed_up=1, identify=1, pageleave=1)
SEGMENT = Counter(page=1, signed_up=1, identify=1, group=1, alias=1)  # RudderStack too


# --- the page origin -------------------------------------------------------------------


@dataclass
class Site:
    """The page server: its origin and every path it was asked for."""

    origin: str
    served: list[str] = field(default_factory=list)

    def url(self, name: str, **query: str) -> str:
        return f"{self.origin}/{name}?{urlencode(query)}"


def page_server(modules: Path, served: list[str]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            served.append(path)
            file = self.file(path)
            if file is None or not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            self.send_response(200)
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            self.send_header("content-type", f"{kind}; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.send_header("cache-control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        @staticmethod
        def file(path: str) -> Path | None:
            for prefix, target in SDK_FILES.items():
                if path == prefix:
                    return modules / target
                if prefix.endswith("/") and path.startswith(prefix) and ".." not in path:
                    return modules / target / path.removeprefix(prefix)
            name = path.lstrip("/")
            if "/" not in name and name.endswith((".html", ".js")):
                return PAGES / name
            return None

        def log_message(self, format: str, *args: Any) -> None:
            pass  # what was asked for is in `served`

    return ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The pages and the SDK files, served on a loopback origin of their own."""
    modules = ensure_web_packages()
    served: list[str] = []
    server = page_server(modules, served)
    thread = threading.Thread(target=server.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield Site(f"http://127.0.0.1:{server.server_address[1]}", served)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the service, keys and the reader tab ---------------------------------------------


@dataclass
class Account:
    name: str
    write: str  # the key a page holds: it may only write
    read: str


@dataclass
class Scene:
    """The service, the page origin, and one tab on the page origin that reads: it
    holds the EventSource streams and fetches summaries."""

    running: Running
    site: Site
    reader: Page

    @property
    def service(self) -> str:
        return str(self.running.client.base_url).rstrip("/")

    async def account(self, prefix: str) -> Account:
        name = unique(prefix)
        write = await made_key(self.running, "write", name)
        read = await made_key(self.running, "read", name)
        keyring = self.running.application.ctx.keyring
        await eventually(lambda: keyring.find(write) and keyring.find(read), what="keys loaded")
        return Account(name, write, read)

    async def watch(self, account: Account, **filters: str) -> str:
        """Open GET /stream/<account> in the reader tab (EventSource: the key as ?key=)."""
        params = json.dumps({"key": account.read, **filters})
        url: str = await self.reader.evaluate(
            f"openStream({json.dumps(self.service)}, {json.dumps(account.name)}, {params})"
        )
        await self.reader.until(f"streams[{json.dumps(url)}].open", f"{url} open", timeout=10)
        return url

    async def streamed(self, url: str) -> list[str]:
        """The event ids the stream delivered so far, in order."""
        received = await self.reader.evaluate(f"streams[{json.dumps(url)}].received")
        return [e["event_id"] for e in received]

    async def open(self, name: str, account: Account, **query: str) -> Page:
        """The SDK page ``name`` for ``account`` in a tab of its own (own storage)."""
        tab = await self.reader.open_tab()
        url = self.site.url(name, service=self.service, key=account.write, **query)
        await tab.navigate(url)
        return tab

    async def leave(self, tab: Page) -> list[dict[str, Any]]:
        """Leave the SDK page for another page of the origin: the sendBeacon calls the
        page made (tests/browser_pages/beacons.js recorded them), each with the URL,
        the body's content type, and whether the browser queued it."""
        await tab.hide(f"{self.site.origin}/reader.html")
        beacons: list[dict[str, Any]] = await tab.evaluate(
            "JSON.parse(localStorage.getItem('beacons') || '[]')"
        )
        return beacons

    async def summary_status(self, reader: Page, account: Account, key: str) -> dict[str, Any]:
        js = (f"readSummary({json.dumps(self.service)}, {json.dumps(account.name)}, "
              f"{json.dumps(key)})")  # fmt: skip
        answer: dict[str, Any] = await reader.evaluate(js, await_promise=True)
        return answer

    async def send(self, path: str, **init: Any) -> dict[str, Any]:
        """fetch() of the service from the reader tab: its status and body text."""
        js = f"send({json.dumps(self.service + path)}, {json.dumps(init)})"
        answer: dict[str, Any] = await self.reader.evaluate(js, await_promise=True)
        return answer


async def made_key(running: Running, scope: str, account: str) -> str:
    response = await running.client.post(
        "/admin/keys", json={"scope": scope, "accounts": [account]}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def started(running: Running, site: Site, page: Page) -> Scene:
    running.start_flusher()
    await page.navigate(f"{site.origin}/reader.html")
    return Scene(running, site, page)


def keyed_settings(site: Site) -> dict[str, Any]:
    """Keys on (a bootstrap admin key makes the pages' keys); the page origin may read."""
    return {"api_keys": f"{BOOT}=*@admin", "keys_refresh_seconds": 0.2,
            "cors_read_origins": site.origin}  # fmt: skip


@pytest.fixture
async def scene(app: AppFactory, site: Site, page: Page) -> Scene:
    return await started(await app(**keyed_settings(site)), site, page)


# --- what the service stored and streamed ---------------------------------------------


def stored_types(backends: Backends, account: str) -> Counter[str]:
    return Counter(d["type"] for d in backends.events.find({"account_id": account}, {"type": 1}))


def stored_ids(backends: Backends, account: str, **match: Any) -> list[str]:
    found = backends.events.find({"account_id": account, **match}, {"event_id": 1})
    return sorted(d["event_id"] for d in found)


async def all_stored(
    running: Running, account: Account, expected: Counter[str], tab: Page | None = None
) -> None:
    """Exactly ``expected`` events of each type (the store keeps one per event id: a
    resend with a new id, or an event lost, shows here); on a timeout, what ``tab`` saw."""
    try:
        await eventually(lambda: stored_types(running.backends, account.name) == expected,
                         20, 0.1, what=f"{dict(expected)} stored for {account.name}")  # fmt: skip
    except AssertionError as exc:
        found = dict(await asyncio.to_thread(stored_types, running.backends, account.name))
        if tab is not None:
            await tab.pump()
        raise AssertionError(f"{exc}\nstored: {found}\n{seen(tab) if tab else ''}") from None


def seen(tab: Page) -> str:
    """What a tab logged and asked for, to read when a test fails."""
    lines = [str(m) for m in tab.messages()]
    for request in tab.requests():
        lines.append(str(request))
        if request.body and request.method == "POST":
            lines.append(f"    {request.header('content-type')} {decoded(request.body)[:400]}")
    return "\n".join(lines)


def decoded(body: bytes) -> str:
    """A request body as text: gzip and posthog-js's base64 form undone."""
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    elif body.startswith(b"data="):
        body = base64.b64decode(unquote_to_bytes(body[5:].split(b"&")[0]))
    return body.decode(errors="replace")


async def each_streamed_once(scene: Scene, url: str, expected: list[str]) -> None:
    """The stream delivered exactly the ``expected`` event ids, each once."""

    async def delivered() -> bool:
        return len(await scene.streamed(url)) >= len(expected)

    await eventually(delivered, 10, 0.1, what=f"{len(expected)} events on {url}")
    got = await scene.streamed(url)
    assert Counter(got) == Counter(expected), (url, got, expected)
    await scene.reader.evaluate(f"closeStream({json.dumps(url)})")


# --- what the browser saw ----------------------------------------------------------------


def path_of(request: Request) -> str:
    return urlsplit(request.url).path


def to_service(scene: Scene, tab: Page, *paths: str) -> list[Request]:
    """The requests ``tab`` made to the service (not the preflights), to ``paths`` if given."""
    return [r for r in tab.requests()
            if r.url.startswith(scene.service + "/") and r.method != "OPTIONS"
            and (not paths or path_of(r) in paths)]  # fmt: skip


def problems(
    scene: Scene, tab: Page, expected: Callable[[Message | Request], bool] = lambda _: False
) -> list[str]:
    """What went wrong in ``tab``: console errors and warnings, uncaught exceptions, the
    browser's own error lines (a CORS refusal is one), failed requests, answers of 400
    or more, and any request to a third origin, except what ``expected`` allows."""
    out = [str(m) for m in tab.messages()
           if m.level in ("error", "warning") and not expected(m)]  # fmt: skip
    for request in tab.requests():
        if request.url.startswith(("data:", "about:")):
            continue
        if not request.url.startswith((scene.service + "/", scene.site.origin + "/")):
            out.append(f"third origin: {request}")
        elif request.failure:
            # closing an EventSource cancels its request: that is how it ends
            if not (request.canceled and request.type == "EventSource") and not expected(request):
                out.append(str(request))
        elif request.status is not None and request.status >= 400 and not expected(request):
            out.append(str(request))
        elif request.method == "OPTIONS" and not (
            request.status == 204 and request.answer_header("access-control-max-age")
        ):  # a preflight the browser may keep, so unload-time sends need none
            out.append(f"preflight: {request} {request.response_headers}")
    return out


def body_form(request: Request) -> str:
    """How a posthog-js body is encoded, from its bytes and content type."""
    kind = request.header("content-type").split(";")[0]
    body = request.body or b""
    if body[:2] == b"\x1f\x8b":
        return "gzip"
    if kind == "application/x-www-form-urlencoded" and body.startswith(b"data="):
        return "base64"
    if kind == "application/json" and body.lstrip()[:1] in (b"{", b"["):
        return "json"
    return f"{kind or 'no content type'} {body[:12]!r}"


async def done(tab: Page) -> None:
    await tab.pump()
    await tab.close()


# --- posthog-js -----------------------------------------------------------------------


@dataclass
class PosthogRun:
    query: dict[str, str]  # for tests/browser_pages/posthog.html
    fetched: str  # how the bodies sent by fetch are encoded
    beaconed: str  # the content type of the sendBeacon body (leaving the page)
    config: set[str]  # its configuration calls


POSTHOG_RUNS = {
    # as a site would: the remote config and flags from the service (it says it takes
    # gzip); bodies gzip, as text/plain (no preflight)
    "remote config": PosthogRun({}, "gzip", "text/plain", {"config", "flags"}),
    # flags off: no configuration call; init's own compression, the same
    "no config": PosthogRun({"config": '{"advanced_disable_flags": true}'}, "gzip",
                            "text/plain", set()),
    # plain JSON (preflighted); a beacon must stay CORS-simple, so it goes as base64 form
    "uncompressed": PosthogRun({"config": '{"disable_compression": true}'}, "json",
                               "application/x-www-form-urlencoded", {"config", "flags"}),
    # the base64 form throughout, flags call included: what a remote config offering only
    # base64 gets (preloaded the way a token's array.js sets it: no config call then)
    "base64": PosthogRun(
        {"remote_config": '{"supportedCompression": ["base64"], "hasFeatureFlags": true}'},
        "base64", "application/x-www-form-urlencoded", {"flags"},
    ),
}  # fmt: skip


def posthog_config_call(scene: Scene, request: Request) -> str:
    path = path_of(request)
    return "config" if path.startswith("/array/") else path.strip("/")


async def test_posthog_js_every_body_form(scene: Scene) -> None:
    for name, run in POSTHOG_RUNS.items():
        account = await scene.account("ph")
        stream = await scene.watch(account)
        tab = await scene.open("posthog.html", account, **run.query)
        await tab.until("document.body.dataset.state === 'sent'", f"{name}: sent")
        # $pageview at init, the custom event and $identify: sent by fetch
        await all_stored(scene.running, account, POSTHOG - Counter(pageleave=1), tab)
        # leaving the page: $pageleave goes with the last batch, by sendBeacon
        beacons = await scene.leave(tab)
        await all_stored(scene.running, account, POSTHOG, tab)
        await done(tab)

        captures = to_service(scene, tab, "/e/", "/i/v0/e/")
        assert {body_form(r) for r in captures} == {run.fetched}, f"{name}\n{seen(tab)}"
        assert all(r.status == 200 for r in captures), f"{name}\n{seen(tab)}"
        assert [(urlsplit(b["url"]).path, b["type"], b["queued"]) for b in beacons] == [
            ("/e/", run.beaconed, True)
        ], (name, beacons)
        config = to_service(scene, tab, f"/array/{account.write}/config", "/flags/", "/decide/")
        assert {posthog_config_call(scene, r) for r in config} == run.config, seen(tab)
        assert all(r.status == 200 for r in config), f"{name}\n{seen(tab)}"
        if run.fetched == "base64":
            posted = [r for r in captures + config if r.method == "POST"]
            assert all("compression=base64" in r.url for r in posted), f"{name}\n{seen(tab)}"
        assert not problems(scene, tab), (name, problems(scene, tab))
        await each_streamed_once(scene, stream, stored_ids(scene.running.backends, account.name))
        await all_stored(scene.running, account, POSTHOG)  # still once each, after all that

    # /decide/, which posthog-js no longer calls (older versions, from a page, did:
    # a base64 form with their token)
    asked = base64.b64encode(json.dumps({"token": account.write, "distinct_id": "u1"}).encode())
    answer = await scene.send(
        "/decide/?v=3",
        method="POST",
        body=f"data={asked.decode()}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer["status"] == 200 and json.loads(answer["body"])["featureFlags"] == {}, answer
    assert not problems(scene, scene.reader)


# --- Segment analytics.js ---------------------------------------------------------------

BATCHES = {"strategy": "batching", "config": {"size": 3, "timeout": 500}}
SEGMENT_RUNS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # the default: one request per call, to the short paths
    "standard": ({}, {"/v1/p": 1, "/v1/t": 1, "/v1/i": 1, "/v1/g": 1, "/v1/a": 1}),
    # batches of 3 (then the last 2 after 500 ms): two batches, or more on a slow day
    "batching": ({"integrations": {"Segment.io": {"deliveryStrategy": BATCHES}}}, {"/v1/b": 2}),
}


async def test_segment_analytics_js_single_calls_and_batches(scene: Scene) -> None:
    for run, (options, paths) in SEGMENT_RUNS.items():
        account = await scene.account("seg")
        stream = await scene.watch(account)
        tracked = await scene.watch(account, types="signed_up")
        identified = await scene.watch(account, users="user_1")
        tab = await scene.open("segment.html", account, options=json.dumps(options))
        await tab.until("document.body.dataset.state === 'sent'", f"{run}: sent")
        await all_stored(scene.running, account, SEGMENT, tab)
        # the very events the page made: their messageIds are the stored event ids
        made = sorted(await tab.evaluate("window.messageIds"))
        assert stored_ids(scene.running.backends, account.name) == made
        await done(tab)

        settings = to_service(scene, tab, f"/v1/projects/{account.write}/settings")
        assert [r.status for r in settings] == [200], [str(r) for r in settings]
        sent = to_service(scene, tab, *paths)
        if run == "batching":
            assert len(sent) >= paths["/v1/b"], f"{run}\n{seen(tab)}"
            paths = dict.fromkeys(paths, len(sent))
        assert Counter(path_of(r) for r in sent) == Counter(paths), f"{run}\n{seen(tab)}"
        assert all(r.status == 200 and r.header("authorization").startswith("Basic ")
                   for r in sent), [str(r) for r in sent]  # fmt: skip
        assert len(to_service(scene, tab)) == len(settings) + len(sent)
        assert not [p for p in scene.site.served if p.startswith("/sdk/segment/")
                    and p != "/sdk/segment/index.js"], "a lazy chunk was loaded"  # fmt: skip
        assert not problems(scene, tab), (run, problems(scene, tab))
        backends = scene.running.backends
        await each_streamed_once(scene, stream, stored_ids(backends, account.name))
        await each_streamed_once(scene, tracked, stored_ids(backends, account.name,
                                                            type="signed_up"))  # fmt: skip
        await each_streamed_once(scene, identified, stored_ids(backends, account.name,
                                                               user_id="user_1"))  # fmt: skip
    assert not problems(scene, scene.reader)


# --- RudderStack JS SDK ---------------------------------------------------------------

RUDDERSTACK_RUNS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # the default transport: one XHR per call
    "xhr": ({}, {f"/v1/{kind}": 1 for kind in ("page", "track", "identify", "group", "alias")}),
    # sendBeacon: batches of 10 or on leaving the page (or losing focus: then more than
    # one); the write key in the query
    "beacon": ({"useBeacon": True}, {"/beacon/v1/batch": 1}),
}


async def test_rudderstack_js_xhr_and_beacon(scene: Scene) -> None:
    for run, (options, paths) in RUDDERSTACK_RUNS.items():
        account = await scene.account("rs")
        stream = await scene.watch(account)
        tab = await scene.open("rudderstack.html", account, options=json.dumps(options))
        await tab.until("document.body.dataset.state === 'sent'", f"{run}: sent")
        beacons = await scene.leave(tab) if run == "beacon" else []
        await all_stored(scene.running, account, SEGMENT, tab)
        await done(tab)

        config = to_service(scene, tab, "/sourceConfig/")
        assert [r.status for r in config] == [200], [str(r) for r in config]
        assert config[0].header("authorization").startswith("Basic ")
        if run == "beacon":
            # the browser reports no request of the page that was left: the page's record
            sent_paths = Counter(urlsplit(b["url"]).path for b in beacons)
            assert all(b["type"] == "text/plain" and b["queued"] for b in beacons), beacons
            paths = dict.fromkeys(paths, max(1, len(beacons)))
            for beacon in beacons:
                query = parse_qs(urlsplit(beacon["url"]).query)
                assert query["writeKey"] == [account.write], beacon
        else:
            sent = to_service(scene, tab, *paths)
            sent_paths = Counter(path_of(r) for r in sent)
            assert all(r.status == 200 for r in sent), f"{run}\n{seen(tab)}"
        assert sent_paths == Counter(paths), f"{run}\n{seen(tab)}\n{beacons}"
        assert len(to_service(scene, tab)) == len(config) + (0 if beacons else len(paths))
        assert not problems(scene, tab), (run, problems(scene, tab))
        await each_streamed_once(scene, stream, stored_ids(scene.running.backends, account.name))
    assert not problems(scene, scene.reader)


# --- what a page's keys may read ----------------------------------------------------------


async def test_a_page_key_only_writes_and_reads_need_a_listed_origin(scene: Scene) -> None:
    account = await scene.account("keys")
    tab = await scene.open("segment.html", account)
    await tab.until("document.body.dataset.state === 'sent'", "sent")
    await all_stored(scene.running, account, SEGMENT, tab)
    await done(tab)

    # from the page origin (in CORS_READ_ORIGINS): the write key is refused, a read key reads
    denied = await scene.summary_status(scene.reader, account, account.write)
    assert denied["status"] == 403, denied
    allowed = await scene.summary_status(scene.reader, account, account.read)
    assert allowed["status"] == 200, allowed
    assert json.loads(allowed["body"])["total"] == sum(SEGMENT.values())

    # the same page from an origin not in CORS_READ_ORIGINS gets no answer it may read
    port = urlsplit(scene.site.origin).port
    other = await scene.reader.open_tab()
    await other.navigate(f"http://localhost:{port}/reader.html")
    refused = await scene.summary_status(other, account, account.read)
    assert refused["status"] == 0, refused  # fetch() rejected: the browser refused the answer
    await done(other)
    cors = [r for r in other.requests() if "/summary/" in r.url and r.method == "GET"]
    assert cors and all("CORS" in r.failure for r in cors), [str(r) for r in other.requests()]

    # the reader's only error lines are the 403's (the browser logs a failed load)
    def the_403(item: Message | Request) -> bool:
        if isinstance(item, Request):
            return item.status == 403 and "/summary/" in item.url
        return item.source == "network" and "403" in item.text

    assert not problems(scene, scene.reader, the_403)


# --- retries: Redis stops for a few seconds ----------------------------------------------


@pytest.fixture
async def own_app(own_stack: Stack) -> AsyncIterator[AppFactory]:
    """Like the ``app`` fixture, on servers this test alone controls (to stop Redis)."""
    async for factory in apps_on(own_stack):
        yield factory


async def test_sdks_retry_through_a_redis_outage_and_store_each_event_once(
    own_app: AppFactory, own_stack: Stack, site: Site, page: Page
) -> None:
    assert own_stack.redis is not None
    scene = await started(await own_app(**keyed_settings(site)), site, page)
    # each SDK loaded and configured (posthog-js's $pageview at init stored) before
    # Redis stops; then the calls, answered 503 until it is back
    runs = {
        "posthog.html": (POSTHOG - Counter(pageleave=1), ("/e/",)),
        "segment.html": (SEGMENT, ("/v1/p", "/v1/t", "/v1/i", "/v1/g", "/v1/a")),
        "rudderstack.html": (SEGMENT, tuple(f"/v1/{k}" for k in
                                            ("page", "track", "identify", "group", "alias"))),
    }  # fmt: skip
    tabs: dict[str, tuple[Account, Page]] = {}
    for name in runs:
        account = await scene.account(name.split(".")[0][:8])
        tab = await scene.open(name, account, hold="1")
        await tab.until("document.body.dataset.state === 'ready'", f"{name} ready")
        tabs[name] = account, tab
    await all_stored(scene.running, tabs["posthog.html"][0], Counter(pageview=1))

    own_stack.redis.stop()
    try:
        for _account, tab in tabs.values():
            await tab.evaluate("sendEvents(); true")

        async def refused_each() -> bool:
            for name, (_account, tab) in tabs.items():
                await tab.pump()
                if not any(r.status == 503 for r in to_service(scene, tab, *runs[name][1])):
                    return False
            return True

        await eventually(refused_each, 20, 0.1, what="a 503 to each SDK")
    finally:
        own_stack.redis.start()

    for name, (account, tab) in tabs.items():
        expected, paths = runs[name]
        await all_stored(scene.running, account, expected, tab)

        async def settled(tab: Page = tab, paths: tuple[str, ...] = paths) -> bool:
            await tab.pump()
            return all(r.settled for r in to_service(scene, tab, *paths))

        # every request the SDK made (retries included) answered: nothing left to come
        await eventually(settled, 20, 0.1, what=f"{name}: every request answered")
        sent = to_service(scene, tab, *paths)
        refused = [r for r in sent if r.status == 503]
        assert refused, f"{name}\n{seen(tab)}"
        for answer in refused:  # what the SDKs' backoff may read, cross-origin
            assert answer.answer_header("retry-after").isdigit(), answer.response_headers
            assert "retry-after" in answer.answer_header("access-control-expose-headers").lower()
        # each path that was refused was then accepted
        assert {path_of(r) for r in refused} <= {path_of(r) for r in sent if r.status == 200}

        # the 503s are the only errors: the answers, and the line the browser logs for
        # each (the SDKs log nothing of their own about a retry)
        def the_outage(item: Message | Request) -> bool:
            if isinstance(item, Request):
                return item.status == 503
            return item.source == "network" and "status of 503" in item.text

        assert not problems(scene, tab, the_outage), (name, problems(scene, tab, the_outage))
        # and exactly once each, now that the SDK has nothing left to send
        await all_stored(scene.running, account, expected, tab)

    # posthog-js's page closes: its $pageleave, by sendBeacon, now that Redis is back
    account, tab = tabs["posthog.html"]
    await scene.leave(tab)
    await all_stored(scene.running, account, POSTHOG, tab)
    for _account, tab in tabs.values():
        await done(tab)
