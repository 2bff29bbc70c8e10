"""GET /dashboard in a real browser: Debian's chromium, headless, driven over the DevTools
protocol against the service (in-process) holding known events.

The test reads the rendered DOM (parsed here, not by the page) and checks that
the numbers on the page equal /summary's, that the chart's bars add up to them,
that it asks for the API key and picks accounts and windows from the form and the
URL, that it refreshes by itself, that every request it makes goes to the service,
and that a phone-width viewport needs no sideways scrolling. It writes the
screenshots the README shows (docs/dashboard.png, docs/dashboard-phone.png).
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scripts.stack import ROOT
from tests import browser
from tests.browser import Dom, Node, Page
from tests.conftest import AppFactory, Running
from tests.support import drained, eventually, iso, unique

chromium, page = browser.chromium, browser.page  # the fixtures, used by name
DOCS = ROOT / "docs"
KEY = "k_dash"


def number(text: str) -> int:
    return int(text.replace(",", ""))


def shown(dom: Node) -> dict[str, Any]:
    """The figures the page shows, read like /summary's."""
    types = {row.attrs["data-type"]: number(row.with_class("count").text())
             for row in dom.by_id("types").having("data-type")}  # fmt: skip
    users = [{"user_id": row.with_class("user").text(),
              "events": number(row.with_class("count").text())}
             for row in dom.by_id("top-users").having("data-user")]  # fmt: skip
    for row, user in zip(dom.by_id("top-users").having("data-user"), users, strict=True):
        assert row.attrs["data-user"] == user["user_id"]
    return {
        "total": number(dom.by_id("total").text()),
        "totals": dict(sorted(types.items())),
        "unique_users": number(dom.by_id("unique-users").text()),
        "top_users": users,
    }


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("total", "totals", "unique_users", "top_users")}


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def known_events(account: str, now: datetime, count: int) -> list[dict[str, Any]]:
    """A mix of five types and a dozen users, spread over the last day."""
    kinds = (
        ["page_view"] * 5 + ["message_sent"] * 3 + ["login"] * 2 + ["call_made", "form_submitted"]
    )
    return [{"event_id": f"d{i}", "account_id": account, "user_id": f"user_{(i * i) % 23}",
             "type": kinds[i * 7 % len(kinds)],
             "timestamp": iso(now - timedelta(seconds=20 + (i * 433) % (23 * 3600)
                                              + (0 if i % 3 else (i * 37) % 3000)))}
            for i in range(count)]  # fmt: skip


async def store(running: Running, account: str, events: list[dict[str, Any]], total: int) -> None:
    headers = {"x-api-key": KEY}
    for i in range(0, len(events), 200):
        response = await running.post(events[i : i + 200], headers=headers)
        assert response.status_code == 202, response.text
    await eventually(drained(running.backends, account, total), what=f"{total} stored")


async def summary(running: Running, account: str, window: str = "24h") -> dict[str, Any]:
    response = await running.client.get(f"/summary/{account}", headers={"x-api-key": KEY},
                                        params={"window": window, "top": 10})  # fmt: skip
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_the_dashboard_shows_the_summary_in_a_real_browser(
    app: AppFactory, page: Page
) -> None:
    running = await app(api_keys=f"{KEY}=*")
    running.start_flusher()
    now = datetime.now(UTC)
    account, other = unique("dash"), unique("dash_b")
    await store(running, account, known_events(account, now, 1500), 1500)
    await store(running, other, known_events(other, now, 25), 25)
    base = str(running.client.base_url).rstrip("/")

    served = await running.client.get("/dashboard")
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in served.headers["content-security-policy"]

    # keys are on: the page says so, then works once one is typed in
    await page.viewport(1280, 900, mobile=False)
    await page.call("Page.navigate", url=f"{base}/dashboard#{account}")
    await page.until("document.body?.dataset.state === 'error'", "the 401 shown")
    status = (await page.dom()).by_id("status").text()
    assert "401" in status and account in status, status
    await page.evaluate(f"document.getElementById('api-key').value = {json.dumps(KEY)};"
                        "document.getElementById('controls').requestSubmit(); true")  # fmt: skip
    await page.until("document.body?.dataset.state === 'ready'", "the figures shown")

    dom = await page.dom()
    expected = await summary(running, account)
    assert shown(dom) == figures(expected)
    assert expected["total"] == 1500 and len(expected["totals"]) == 5
    assert len(expected["top_users"]) == 10
    bars = dom.by_id("chart").having("data-total")
    assert sum(int(b.attrs["data-total"]) for b in bars) == expected["total"]
    assert len(bars) > 20  # events spread over the day
    as_of = datetime.fromisoformat(dom.by_id("as-of").attrs["datetime"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - as_of) < timedelta(minutes=1)
    assert await page.evaluate("location.hash") == f"#{account}"
    await page.screenshot(DOCS / "dashboard.png", 1280)

    # it refreshes by itself: a new event shows up without touching the page
    fresh = {"event_id": "fresh", "account_id": account, "user_id": "user_new", "type": "login",
             "timestamp": iso(datetime.now(UTC) - timedelta(seconds=5))}  # fmt: skip
    await store(running, account, [fresh], 1501)
    await page.until("document.getElementById('total').textContent === '1,501'",
                     "the refreshed total", timeout=20)  # fmt: skip
    assert shown(await page.dom()) == figures(await summary(running, account))

    # phone width: same figures, laid out to fit (no sideways scrolling)
    await page.viewport(390, 844, mobile=True)
    await page.until("document.querySelector('#chart svg').viewBox.baseVal.width <= 390",
                     "the chart redrawn for the phone")  # fmt: skip
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        "the page scrolls sideways at 390 px"
    )
    assert shown(await page.dom()) == figures(await summary(running, account))
    await page.screenshot(DOCS / "dashboard-phone.png", 390)

    # another account and window, picked in the form, remembered in the URL
    await page.evaluate(f"document.getElementById('account').value = {json.dumps(other)};"
                        "document.getElementById('window').value = '1h';"
                        "document.getElementById('controls').requestSubmit(); true")  # fmt: skip
    await page.until(f"location.hash === {json.dumps('#' + other + '/1h')}", "the new hash")
    expected_other = await summary(running, other, "1h")
    await page.until(f"document.getElementById('total').textContent === "
                     f"'{expected_other['total']}'", "the other account shown")  # fmt: skip
    assert shown(await page.dom()) == figures(expected_other)

    # everything it loaded came from the service; nothing failed in the page
    await page.evaluate("true")  # collect the events sent meanwhile
    urls = [e["params"]["request"]["url"] for e in page.events
            if e.get("method") == "Network.requestWillBeSent"]  # fmt: skip
    assert urls and all(u.startswith(base + "/") or u.startswith("data:") for u in urls), urls
    thrown = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not thrown, thrown
    logged = [e["params"]["entry"] for e in page.events if e.get("method") == "Log.entryAdded"]
    # the 401s before the key was typed are the only errors
    assert all(e["source"] == "network" and "401" in e["text"] for e in logged
               if e["level"] == "error"), logged  # fmt: skip

    for name, width in (("dashboard.png", 1280), ("dashboard-phone.png", 390)):
        size = png_size(DOCS / name)
        assert size[0] == width and size[1] > 600, (name, size)


async def test_the_page_is_self_contained(app: AppFactory) -> None:
    """Nothing to load from elsewhere, and a policy that makes the browser refuse it anyway."""
    running = await app()
    response = await running.client.get("/dashboard")
    for node in Dom(response.text).root.walk():
        assert "src" not in node.attrs, node.tag  # scripts and styles are inline
        for attr in ("href", "action"):
            if attr in node.attrs:
                assert node.attrs[attr].startswith("data:"), (node.tag, node.attrs)
    assert "@import" not in response.text and "url(" not in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "'sha256-" in policy
