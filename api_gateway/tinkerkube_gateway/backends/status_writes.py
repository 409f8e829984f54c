"""Coalesced writes: the Kubernetes backend mirrors futures into each TrainingSession's status through a
`Coalescer`, so the API server sees at most one write per session per interval whatever the call rate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Coalescer:
    """Per key: the first value is written at once, later ones at most once per `interval`; the
    latest value wins and a trailing write always happens. `clock`/`sleep` are injectable for tests."""

    def __init__(self, write: Callable[[str, Any], Awaitable[None]], interval: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._write, self.interval, self._clock, self._sleep = write, interval, clock, sleep
        self._latest: dict[str, Any] = {}
        self._last_write: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.writes = 0
        self.min_spacing = math.inf  # the shortest gap seen between two writes of one key (≥ interval)

    def offer(self, key: str, value: Any) -> None:
        self._latest[key] = value
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key))

    async def _drain(self, key: str) -> None:
        try:
            while key in self._latest:
                wait = self._last_write.get(key, -math.inf) + self.interval - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                value = self._latest.pop(key)
                now = self._clock()
                if key in self._last_write:
                    self.min_spacing = min(self.min_spacing, now - self._last_write[key])
                self._last_write[key] = now
                self.writes += 1
                try:
                    await self._write(key, value)
                except Exception:  # a lost mirror write must never fail a future
                    log.warning("status write for %s failed", key, exc_info=True)
        finally:
            self._tasks.pop(key, None)

    def forget(self, key: str) -> None:
        self._latest.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._last_write.pop(key, None)

    async def flush(self) -> None:
        """Write whatever is pending now (shutdown), ignoring the interval."""
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
        pending, self._latest = self._latest, {}
        for key, value in pending.items():
            with contextlib.suppress(Exception):
                await self._write(key, value)
