"""Waiting for a condition in tests without fixed sleeps, reporting the last value seen on timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class NotYet(AssertionError):
    pass


async def eventually(probe: Callable[[], Awaitable[T]], predicate: Callable[[T], bool], *, timeout: float = 30.0,
                     interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: object = "<never probed>"
    while True:
        try:
            last = await probe()
            if predicate(last):  # type: ignore[arg-type]
                return last  # type: ignore[return-value]
        except Exception as exc:  # a probe that raises is "not yet", reported if it never passes
            last = exc
        if time.monotonic() > deadline:
            raise NotYet(f"{what} not reached within {timeout}s; last seen: {last!r}")
        await asyncio.sleep(interval)


def eventually_sync(probe: Callable[[], T], predicate: Callable[[T], bool], *, timeout: float = 30.0,
                    interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: object = "<never probed>"
    while True:
        try:
            last = probe()
            if predicate(last):  # type: ignore[arg-type]
                return last  # type: ignore[return-value]
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise NotYet(f"{what} not reached within {timeout}s; last seen: {last!r}")
        time.sleep(interval)
