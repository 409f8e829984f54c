"""Futures aggregates per training run, handed to the backend (the CR's `status.futures`).

Read from the store on each flush (the run's counters row, kept in the transactions that store and
finish each future, and two index range scans for the short window of the most recent futures), never
counted in memory: they are right after a gateway restart and whichever replica writes them, and a
flush costs the same at the run's millionth future as at its first. Changes are coalesced per run here
(at most one derivation per `interval`, the last change always flushed) and again by the backend (about
one status write per second per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from tinkerkube_contract.resource import RECENT_FUTURES_WINDOW, FuturesStatus, RecentFuture
from tinkerkube_gateway.backends.base import SessionBackend
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 60.0  # how often a heartbeating session refreshes its runs' status.futures.updatedAt


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class FuturesMirror:
    def __init__(self, backend: SessionBackend, repo: AsyncRepo, *, interval: float = 0.25,
                 keepalive_interval: float = KEEPALIVE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.repo = repo
        self.interval = interval
        self.keepalive_interval = keepalive_interval
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._last_write: dict[str, float] = {}

    async def changed(self, fut: FutureRecord, state: FutureState) -> None:
        if ":train:" not in fut.target_id:
            return  # samples are mirrored by nobody: their sampler may be shared
        self.touch(fut.target_id)

    def touch(self, model_id: str) -> None:
        if model_id in self._tasks:
            self._again.add(model_id)
            return
        self._tasks[model_id] = asyncio.get_running_loop().create_task(self._flush(model_id))

    def keepalive(self, model_ids: list[str]) -> None:
        """The SDK is heartbeating: refresh `updatedAt` of runs not written for a while. The operator
        counts idleness from it, so a live session that merely pauses is never reaped as idle, while
        a run whose gateway vanished still is. Bounded: one write per run per keepalive interval."""
        now = self._clock()
        for model_id in model_ids:
            if now - self._last_write.get(model_id, float("-inf")) >= self.keepalive_interval:
                self._last_write[model_id] = now
                self.touch(model_id)

    async def derive(self, model_id: str) -> FuturesStatus:
        counts = await self.repo.run_aggregates(model_id)
        recent = [RecentFuture(request_id=rid, op=op, seq_id=seq, state=state, updated_at=_iso(at))
                  for rid, op, seq, state, at in await self.repo.recent_futures(model_id, RECENT_FUTURES_WINDOW)]
        return FuturesStatus(**counts, updated_at=datetime.now(UTC).isoformat(), recent=recent)

    async def _flush(self, model_id: str) -> None:
        try:
            while True:
                self._again.discard(model_id)
                self._last_write[model_id] = self._clock()
                try:
                    await self.backend.mirror_futures(model_id, await self.derive(model_id))
                except Exception:
                    log.warning("could not mirror futures of %s", model_id, exc_info=True)
                await asyncio.sleep(self.interval)
                if model_id not in self._again:
                    return
        finally:
            self._tasks.pop(model_id, None)

    async def drain(self) -> None:
        """Until every pending flush is written (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    def forget(self, model_id: str) -> None:
        self._again.discard(model_id)
        self._last_write.pop(model_id, None)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
