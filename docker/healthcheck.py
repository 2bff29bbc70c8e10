"""The image's HEALTHCHECK: exit 0 when this container's service answers GET /health.

The slim image has no curl; this uses only the standard library. It asks the
port the service listens on (``PORT``, as ``scripts/serve.py`` reads it) on the
loopback interface, which ``HOST=0.0.0.0`` (the image's) includes.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 2.0


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT') or '8000'}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
