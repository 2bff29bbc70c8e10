"""GET /dashboard: one self-contained page (``dashboard.html``) over /summary and /timeseries.

No build step and nothing from elsewhere: the page's CSS and JavaScript are
inline, and its Content-Security-Policy allows exactly those (by hash) plus
requests to this service, so a browser refuses anything else it might try to load.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from sanic import HTTPResponse, Request

PAGE = Path(__file__).with_name("dashboard.html").read_bytes()
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def _policy(page: bytes) -> str:
    sources: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        sources[kind].append(f"'sha256-{digest}'")
    return "; ".join([
        "default-src 'none'",
        "connect-src 'self'",
        f"script-src {' '.join(sources[b'script'])}",
        f"style-src {' '.join(sources[b'style'])}",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])  # fmt: skip


HEADERS = {
    "Content-Security-Policy": _policy(PAGE),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def get_dashboard(request: Request) -> HTTPResponse:
    return HTTPResponse(PAGE, content_type="text/html; charset=utf-8", headers=HEADERS)
