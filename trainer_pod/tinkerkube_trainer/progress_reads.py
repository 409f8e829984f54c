"""Streaming reads of running samples (`GET /v1/sample-progress/{id}`): long-polls woken by decode steps.

Why a count of waiters: the decoder wakes readers after every step, which costs the event loop a wake-up
per token; it does so only while somebody waits (`watched`), so an unwatched decode pays nothing.
"""

from __future__ import annotations

import asyncio

from tinkerkube_contract.pod_api import SampleProgress
from tinkerkube_trainer.run_queue import Entry, Notifier


class ProgressReads:
    def __init__(self) -> None:
        self._notifier = Notifier()
        self._waiters = 0

    def notify_all(self) -> None:
        """A decode step was recorded, or a sample finished."""
        self._notifier.notify_all()

    def watched(self) -> bool:
        return self._waiters > 0

    async def read(self, entry: Entry, after: int, timeout: float) -> SampleProgress:
        """A sample's tokens past `after`, once there are some, it finished, or `timeout` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        self._waiters += 1
        try:
            while (not entry.done and (entry.progress is None or entry.progress.published <= after)
                   and (remaining := deadline - loop.time()) > 0):
                await self._notifier.wait(remaining)
        finally:
            self._waiters -= 1
        if entry.done or entry.progress is None:
            return SampleProgress(state=entry.state, next=after)
        return entry.progress.read(after)
