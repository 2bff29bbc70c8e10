"""Serve the service with the listener and worker count from the settings.

    python -m scripts.serve          # what `make run` runs, inside scripts.stack

``HOST``, ``PORT`` and ``WORKERS`` are read once, with every other setting, by
``core.settings``; this passes them to Sanic's own command line, so there is
one source for them (the Makefile has no copies).
"""

from __future__ import annotations

import os
import sys

from core.settings import SettingsError, load_settings


def command(argv: list[str] | None = None) -> list[str]:
    settings = load_settings()
    # a host without the http role still answers /health, /ready and /metrics
    workers = settings.workers if settings.runs("http") else 1
    return [
        sys.executable, "-m", "sanic", "service.app:create_app", "--factory",
        "--host", settings.host, "--port", str(settings.port),
        "--workers", str(workers), *(argv or []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        args = command(argv if argv is not None else sys.argv[1:])
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.execv(args[0], args)  # Sanic's main process takes over this pid and its signals
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
