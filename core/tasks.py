"""Stopping background tasks for sure.

On Python 3.11, ``asyncio.wait_for`` returns its future's result instead of
raising when the task is cancelled in the loop turn that future completes
(CPython gh-86296, fixed in 3.12). redis-py and pymongo wrap every socket read
in ``wait_for``, so a ``task.cancel()`` that lands as a reply arrives is lost,
and a polling loop cancelled that way runs on: whoever awaited it waited for
ever (the test suite's teardown hung on it, one run in a few). A cancellation
is therefore repeated until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_SECONDS = 0.05  # how long a cancellation is given before it is sent again


async def stop(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended (their results, errors
    and cancellations are dropped: a stopped task's outcome is nobody's)."""
    every = list(tasks)
    pending = {task for task in every if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
    for task in every:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
