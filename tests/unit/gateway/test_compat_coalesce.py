"""Concurrent items under one key within the window go in one call; each gets its own result or the call's error."""

from __future__ import annotations

import asyncio

import pytest

from tinkerkube_gateway.compat.coalesce import Coalescer


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await asyncio.sleep(0)
        if self.fail:
            raise ValueError("trainer said no")
        return [i * 10 for i in items]


async def test_items_within_the_window_share_one_call_in_order() -> None:
    merge: Coalescer[int, int] = Coalescer(window=0.02, limit=100)
    call = Recorder()
    results = await asyncio.gather(*(merge.submit("k", i, call) for i in range(5)))
    assert results == [0, 10, 20, 30, 40] and call.calls == [[0, 1, 2, 3, 4]]


async def test_keys_never_mix_and_a_later_item_starts_a_new_window() -> None:
    merge: Coalescer[int, int] = Coalescer(window=0.01, limit=100)
    call = Recorder()
    assert await asyncio.gather(merge.submit("a", 1, call), merge.submit("b", 2, call)) == [10, 20]
    assert await merge.submit("a", 3, call) == 30
    assert sorted(call.calls) == [[1], [2], [3]]


async def test_a_full_batch_goes_at_once_and_the_rest_wait_for_the_next() -> None:
    merge: Coalescer[int, int] = Coalescer(window=10.0, limit=3)  # the window would never end in this test
    call = Recorder()
    first = await asyncio.wait_for(asyncio.gather(*(merge.submit("k", i, call) for i in range(3))), 1.0)
    assert first == [0, 10, 20] and call.calls == [[0, 1, 2]]


async def test_a_failed_call_fails_every_item_of_it() -> None:
    merge: Coalescer[int, int] = Coalescer(window=0.01, limit=100)
    results = await asyncio.gather(*(merge.submit("k", i, Recorder(fail=True)) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


async def test_a_waiter_that_went_away_does_not_break_the_others() -> None:
    merge: Coalescer[int, int] = Coalescer(window=0.02, limit=100)
    call = Recorder()
    gone = asyncio.ensure_future(merge.submit("k", 1, call))
    stays = asyncio.ensure_future(merge.submit("k", 2, call))
    await asyncio.sleep(0)
    gone.cancel()
    assert await stays == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
