"""Concurrent requests' small trainer calls, merged into one call per key and short window.

Why: a trainer pool decodes together the samples that are waiting when a sampling pass starts. Concurrent
chat requests each need their chat rendered before their sample is submitted; rendered one call each, the
first sample reaches the trainer alone and starts a pass by itself while the others wait for the next. Merged
into one render call, their samples are submitted together and share a pass, as concurrent `asample` calls
do. The window (a few milliseconds, from the first item) is all a lone request waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Call = Callable[[list[T]], Awaitable[list[R]]]  # items → one result per item, in order


class Coalescer(Generic[T, R]):
    def __init__(self, *, window: float, limit: int):
        self.window = window
        self.limit = limit
        self._open: dict[str, list[tuple[T, asyncio.Future[R]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def submit(self, key: str, item: T, call: Call[T, R]) -> R:
        """`item`'s result, from a call made with every item submitted under `key` within the window
        (the first item's `call` makes it). A failed call fails every item of it."""
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = []
            loop.call_later(self.window, self._send, key, batch, call)
        fut: asyncio.Future[R] = loop.create_future()
        batch.append((item, fut))
        if len(batch) >= self.limit:
            self._send(key, batch, call)
        return await fut

    def _send(self, key: str, batch: list[tuple[T, asyncio.Future[R]]], call: Call[T, R]) -> None:
        if self._open.get(key) is not batch:
            return  # already sent (full before its window ended)
        del self._open[key]
        task = asyncio.ensure_future(self._run(batch, call))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _run(batch: list[tuple[T, asyncio.Future[R]]], call: Call[T, R]) -> None:
        try:
            results = await call([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a merged call answered {len(results)} results for {len(batch)} items")
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():  # a waiter that went away (client disconnect) is skipped
                fut.set_result(result)
