"""Background tasks stop for sure, even when Python 3.11 loses a cancellation."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from core import tasks
from tests.support import eventually

LOSES_CANCELLATIONS = sys.version_info < (3, 12)  # CPython gh-86296


class Poller:
    """A loop like the key ring's: each round waits for a reply through ``wait_for``,
    as redis-py and pymongo do. The test answers each reply by hand."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[None] | None = None
        self.rounds = 0

    async def run(self) -> None:
        while True:
            self.reply = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.reply, 30)
            self.rounds += 1

    async def waiting(self) -> asyncio.Future[None]:
        async def pending() -> bool:
            return self.reply is not None and not self.reply.done()

        await eventually(pending, timeout=5)
        assert self.reply is not None
        return self.reply


async def _cancel_as_the_reply_arrives(poller: Poller, cancel: Any) -> None:
    reply = await poller.waiting()
    reply.set_result(None)  # the reply and the cancellation in the same loop turn
    await cancel()


async def test_a_cancellation_lost_in_wait_for_is_sent_again() -> None:
    poller = Poller()
    task = asyncio.ensure_future(poller.run())
    await _cancel_as_the_reply_arrives(poller, lambda: asyncio.wait_for(tasks.stop([task]), 5))
    assert task.cancelled()
    if LOSES_CANCELLATIONS:
        assert poller.rounds == 1, "the first cancellation was lost and the loop went round"


@pytest.mark.skipif(not LOSES_CANCELLATIONS, reason="Python 3.12 keeps the cancellation")
async def test_without_it_the_loop_runs_on() -> None:
    """What the helper is for: a single ``cancel()`` is lost here, and the loop lives."""
    poller = Poller()
    task = asyncio.ensure_future(poller.run())

    async def cancel_once() -> None:
        task.cancel()

    await _cancel_as_the_reply_arrives(poller, cancel_once)
    (await poller.waiting()).set_result(None)

    async def went_round_again() -> bool:
        return poller.rounds == 2

    await eventually(went_round_again, timeout=5)
    assert not task.done()
    await tasks.stop([task])
    assert task.done()
