"""Debian's chromium, headless, driven over the DevTools protocol (no chromium-driver):
the browser, its tabs and what they log, shared by the browser tests
(tests/test_dashboard.py, tests/test_browsers.py).

One browser per test (``page`` fixture: a fresh profile). ``Page`` is one tab on a
flattened session of the browser's socket; more tabs, each in its own browser
context if asked (their own cookies, storage and connections), come from
``page.open_tab()``. Each tab keeps the protocol events sent to it in ``events``
(read while a call waits for its answer; ``pump()`` reads what arrived since), and
reads them back as console messages (``messages()``) and requests (``requests()``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from scripts.stack import ensure_chromium
from tests.support import eventually

FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests may run as root
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip
DOMAINS = ("Page", "Runtime", "Network", "Log")


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children).strip()

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def by_id(self, id_: str) -> Node:
        found = [n for n in self.walk() if n.attrs.get("id") == id_]
        assert len(found) == 1, f"#{id_}: {len(found)} elements"
        return found[0]

    def having(self, attr: str) -> list[Node]:
        return [n for n in self.walk() if attr in n.attrs]

    def with_class(self, name: str) -> Node:
        found = [n for n in self.walk() if name in n.attrs.get("class", "").split()]
        assert len(found) == 1, f".{name}: {len(found)} elements"
        return found[0]


class Dom(HTMLParser):
    """The serialized DOM as a tree: written here so the page cannot grade itself."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = [self.root]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.open) - 1, 0, -1):
            if self.open[i].tag == tag:
                del self.open[i:]
                return

    def handle_data(self, data: str) -> None:
        self.open[-1].children.append(data)


@dataclass
class Message:
    """One line the page logged: a console call, an uncaught exception, or the
    browser's own log (failed loads, CORS refusals, deprecations)."""

    source: str  # "console", "exception", or the Log entry's source ("network", "javascript"…)
    level: str  # "error", "warning", "info", "log", "debug"…
    text: str
    url: str = ""

    def __str__(self) -> str:
        return f"[{self.source} {self.level}] {self.text}" + (f" ({self.url})" if self.url else "")


@dataclass
class Request:
    """One request as the browser saw it (CORS preflights too: method OPTIONS)."""

    id: str
    url: str
    method: str
    type: str  # Document, Script, Fetch, XHR, EventSource, Other (a preflight)…
    headers: dict[str, str]
    body: bytes | None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    failure: str = ""  # errorText, and the CORS error or the blocked reason when there is one
    canceled: bool = False

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), "")

    def answer_header(self, name: str) -> str:
        return next((v for k, v in self.response_headers.items()
                     if k.lower() == name.lower()), "")  # fmt: skip

    @property
    def settled(self) -> bool:
        """Answered, or failed: nothing more will come of it."""
        return self.status is not None or bool(self.failure)

    def __str__(self) -> str:
        outcome = self.failure or (str(self.status) if self.status is not None else "pending")
        return f"{self.method} {self.url} [{self.type}] → {outcome}"


def remote_text(arg: dict[str, Any]) -> str:
    """A console argument as the console would print it, roughly."""
    if "value" in arg:
        value = arg["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(arg.get("description") or arg.get("unserializableValue") or arg.get("type"))


class Browser:
    """The browser's DevTools socket: one call at a time; events go to their tab."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.tabs: dict[str, Page] = {}
        self.events: list[dict[str, Any]] = []  # browser-level ones (no session)
        self._next = 0

    async def call(self, method: str, session: str = "", **params: Any) -> dict[str, Any]:
        self._next += 1
        number = self._next
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(await asyncio.wait_for(self.socket.recv(), 30))
            if reply.get("id") != number:
                tab = self.tabs.get(reply.get("sessionId", ""))
                (tab.events if tab else self.events).append(reply)
                continue
            assert "error" not in reply, (method, reply["error"])
            result: dict[str, Any] = reply["result"]
            return result


class Page:
    """One browser tab over the DevTools protocol (flattened session on the browser socket)."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.session = ""
        self.target = ""
        self.context = ""  # its own browser context, or "" for the default one
        self.events: list[dict[str, Any]] = []

    async def attach(self, isolated: bool = False) -> Page:
        """Open the tab (on about:blank) and enable the domains it reports."""
        if isolated:
            made = await self.browser.call("Target.createBrowserContext", disposeOnDetach=True)
            self.context = made["browserContextId"]
        target = await self.browser.call("Target.createTarget", url="about:blank",
                                         **({"browserContextId": self.context}
                                            if self.context else {}))  # fmt: skip
        self.target = target["targetId"]
        attached = await self.browser.call("Target.attachToTarget", targetId=self.target,
                                           flatten=True)  # fmt: skip
        self.session = attached["sessionId"]
        self.browser.tabs[self.session] = self
        for domain in DOMAINS:
            params = {"maxPostDataSize": 1 << 20} if domain == "Network" else {}
            await self.call(f"{domain}.enable", **params)
        return self

    async def open_tab(self, isolated: bool = True) -> Page:
        """Another tab of the same browser, by default with its own storage and connections."""
        return await Page(self.browser).attach(isolated)

    async def close(self) -> None:
        """Close the tab (the page gets pagehide first); its events stay readable."""
        await self.browser.call("Target.closeTarget", targetId=self.target)
        if self.context:
            await self.browser.call("Target.disposeBrowserContext",
                                    browserContextId=self.context)  # fmt: skip

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.call(method, self.session, **params)

    async def pump(self) -> None:
        """Read the events sent so far (they are read only while a call waits)."""
        await self.browser.call("Browser.getVersion")

    async def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=await_promise)  # fmt: skip
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def navigate(self, url: str, timeout: float = 30) -> None:
        """Go to ``url`` and wait for its load event (the old page gets pagehide first)."""
        seen = len(self.events)
        started = await self.call("Page.navigate", url=url)
        assert "errorText" not in started, (url, started)

        def loaded() -> bool:
            return any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:])

        async def check() -> bool:
            await self.pump()
            return loaded()

        await eventually(check, timeout, 0.05, what=f"{url} loaded")

    async def hide(self, to: str = "about:blank") -> None:
        """Leave the page the way a user does (for ``to``, about:blank or the next page):
        pagehide and unload fire, so what SDKs send then (sendBeacon, keepalive
        fetches) goes out. The browser reports no request of the page that is gone."""
        await self.navigate(to)

    async def dom(self) -> Node:
        return Dom(await self.evaluate("document.documentElement.outerHTML")).root

    async def viewport(self, width: int, height: int, mobile: bool) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=mobile)  # fmt: skip

    async def screenshot(self, path: Path, width: int) -> None:
        """The whole page at this width (however tall it is)."""
        height = await self.evaluate("document.documentElement.scrollHeight")
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": width, "height": height,
                                     "scale": 1})  # fmt: skip
        path.write_bytes(base64.b64decode(shot["data"]))

    async def until(self, expression: str, what: str, timeout: float = 30) -> Any:
        async def check() -> Any:
            return await self.evaluate(expression)

        return await eventually(check, timeout, 0.1, what=what)

    def messages(self) -> list[Message]:
        """Everything the tab logged so far (call ``pump()`` first for the latest)."""
        out: list[Message] = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(remote_text(a) for a in params.get("args", []))
                frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
                out.append(Message("console", params["type"], text, frame[0].get("url", "")))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = (details.get("exception") or {}).get("description") or details["text"]
                out.append(Message("exception", "error", text, details.get("url", "")))
            elif method == "Log.entryAdded":
                entry = params["entry"]
                out.append(Message(entry["source"], entry["level"], entry["text"],
                                   entry.get("url", "")))  # fmt: skip
        return out

    def requests(self) -> list[Request]:
        """Every request the tab made so far, with its answer or why it failed."""
        by_id: dict[str, Request] = {}
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                request = params["request"]
                body = None
                if request.get("postDataEntries"):
                    body = b"".join(base64.b64decode(e.get("bytes", ""))
                                    for e in request["postDataEntries"])  # fmt: skip
                elif "postData" in request:
                    body = request["postData"].encode()
                # a redirect reuses the request id: the last hop is what counts
                by_id[params["requestId"]] = Request(
                    params["requestId"], request["url"], request["method"],
                    params.get("type", ""), request.get("headers", {}), body,
                )  # fmt: skip
            elif method == "Network.responseReceived" and params["requestId"] in by_id:
                response = params["response"]
                seen = by_id[params["requestId"]]
                seen.status = response["status"]
                seen.response_headers = response.get("headers", {})
            elif method == "Network.loadingFailed" and params["requestId"] in by_id:
                seen = by_id[params["requestId"]]
                reasons = [params.get("errorText", "")]
                if cors := params.get("corsErrorStatus"):
                    reasons.append(f"CORS {cors['corsError']} {cors.get('failedParameter', '')}")
                if blocked := params.get("blockedReason"):
                    reasons.append(f"blocked: {blocked}")
                seen.failure = " ".join(r for r in reasons if r).strip()
                seen.canceled = bool(params.get("canceled"))
        return list(by_id.values())


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (installed with apt-get when missing and running as root)."""
    return ensure_chromium()


@pytest.fixture
async def page(chromium: str, tmp_path: Path) -> AsyncIterator[Page]:
    """A fresh headless chromium (its own profile; its output in tmp_path/chromium.log)."""
    profile = tmp_path / "profile"
    with (tmp_path / "chromium.log").open("wb") as log:
        browser = await asyncio.create_subprocess_exec(
            chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=log, stderr=log,
        )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        await eventually(lambda: port_file.exists() and len(port_file.read_text().split()) == 2,
                         30, 0.1, what="chromium's DevTools port")  # fmt: skip
        port, path = port_file.read_text().split()
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
            yield await Page(Browser(socket)).attach()
    finally:
        if browser.returncode is None:
            browser.kill()
        await browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
