"""Long-poll waiting: one shared notifier wakes every waiter; waiters never poll the database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.store.records import FutureState
from tinkerkube_gateway.store.repo import AsyncRepo, Repo


class CountingRepo(AsyncRepo):
    def __init__(self, repo: Repo):
        super().__init__(repo)
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        if name == "get_future":
            self.reads += 1
        return super().__getattr__(name)


async def _service(tmp_path: Path) -> tuple[FuturesService, CountingRepo]:
    repo = CountingRepo(Repo(f"sqlite:///{tmp_path / 'gw.db'}"))
    return FuturesService(repo, Metrics(), long_poll_seconds=0.3), repo


async def test_one_completion_wakes_every_waiter_with_one_read_each(tmp_path: Path) -> None:
    """A future created by another replica: each waiter reads the store once, then sleeps."""
    futures, repo = await _service(tmp_path)
    elsewhere = FuturesService(repo, Metrics())
    fut, _ = await elsewhere.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    waiters = [asyncio.create_task(futures.wait("t", fut.request_id, timeout=20)) for _ in range(50)]
    await asyncio.sleep(0.5)  # everyone is asleep on the notifier now; no reads happen meanwhile
    reads_while_waiting = repo.reads
    await asyncio.sleep(0.5)
    assert repo.reads == reads_while_waiting == 50
    started = time.monotonic()
    await futures.complete(fut, b'{"metrics": {}}', "application/json")
    results = await asyncio.gather(*waiters)
    assert time.monotonic() - started < 2
    assert {r.state for r in results} == {FutureState.COMPLETE}
    assert {r.result for r in results} == {b'{"metrics": {}}'}
    assert repo.reads == 50  # the completion here hands its record over: no re-read
    assert futures.notifier.waiting == 0


async def test_waiting_on_a_future_created_here_reads_nothing_until_another_replica_finishes_it(
        tmp_path: Path) -> None:
    futures, repo = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    waiters = [asyncio.create_task(futures.wait("t", fut.request_id, timeout=20)) for _ in range(20)]
    await asyncio.sleep(0.3)
    assert repo.reads == 0 and futures.notifier.waiting == 20
    elsewhere = FuturesService(repo, Metrics())  # another replica finishes it, then its NOTIFY arrives
    await elsewhere.complete(fut, b"{}", "application/json")
    futures.completed_elsewhere(fut.request_id)
    results = await asyncio.gather(*waiters)
    assert {r.state for r in results} == {FutureState.COMPLETE} and repo.reads == 20  # one re-read each
    assert (await futures.wait("t", fut.request_id, timeout=5)).state == FutureState.COMPLETE


async def test_a_future_created_here_is_still_another_tenants_unknown_future(tmp_path: Path) -> None:
    import pytest

    from tinkerkube_gateway.errors import UnknownFuture

    futures, _ = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    with pytest.raises(UnknownFuture):
        await futures.wait("intruder", fut.request_id, timeout=5)


async def test_a_pending_future_is_returned_pending_after_the_hold(tmp_path: Path) -> None:
    futures, _ = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    started = time.monotonic()
    record = await futures.wait("t", fut.request_id)
    assert record.state == FutureState.PENDING and 0.25 < time.monotonic() - started < 2
    assert futures.notifier.waiting == 0


async def test_a_finished_future_is_re_readable(tmp_path: Path) -> None:
    futures, _ = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    await futures.fail(fut, "boom", ErrorCategory.USER)
    for _ in range(3):
        record = await futures.wait("t", fut.request_id)
        assert record.state == FutureState.FAILED and record.error == "boom"


async def test_a_result_finished_here_is_retrieved_once_without_a_read(tmp_path: Path) -> None:
    futures, repo = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    await futures.complete(fut, b'{"metrics": {}}', "application/json")
    first = await futures.wait("t", fut.request_id)
    assert repo.reads == 0 and first.state == FutureState.COMPLETE and first.result == b'{"metrics": {}}'
    again = await futures.wait("t", fut.request_id)
    assert repo.reads == 1 and (again.state, again.result, again.result_type) == \
        (first.state, first.result, first.result_type)


async def test_a_pause_ends_when_its_future_finishes_and_keeps_the_record_for_retrieval(tmp_path: Path) -> None:
    """A stream pausing between progress reads hears of its sample's end at once (no store read), and the
    result read after it still needs no read."""
    futures, repo = await _service(tmp_path)
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    pausing = asyncio.create_task(futures.pause(fut.request_id, 600))
    await asyncio.sleep(0.2)
    assert not pausing.done() and futures.notifier.waiting == 1
    await futures.complete(fut, b'{"metrics": {}}', "application/json")
    await asyncio.wait_for(pausing, 30)  # far below the pause's 600 s: the completion ended it
    await asyncio.wait_for(futures.pause(fut.request_id, 600), 30)  # finished already: no pause at all
    record = await futures.wait("t", fut.request_id)
    assert record.state == FutureState.COMPLETE and record.result == b'{"metrics": {}}' and repo.reads == 0
    assert futures.notifier.waiting == 0


async def test_a_pause_on_a_future_not_created_here_sleeps_without_reading(tmp_path: Path) -> None:
    futures, repo = await _service(tmp_path)
    elsewhere = FuturesService(repo, Metrics())
    fut, _ = await elsewhere.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    pausing = asyncio.create_task(futures.pause(fut.request_id, 600))
    await asyncio.sleep(0.2)
    assert not pausing.done() and repo.reads == 0
    pausing.cancel()


class SlowFinishRepo(AsyncRepo):
    """finish_future runs `before` first (with a yield, as a write in a thread would): what waiters see while
    the result is being written."""

    def __init__(self, repo: Repo, before: Any):
        super().__init__(repo)
        self.before = before

    def __getattr__(self, name: str) -> Any:
        real = super().__getattr__(name)
        if name != "finish_future":
            return real

        async def finish_future(*args: Any, **kwargs: Any) -> Any:
            await self.before()
            return await real(*args, **kwargs)

        return finish_future


async def test_the_waiter_of_an_op_finished_here_is_answered_before_the_store_write(tmp_path: Path) -> None:
    """The result reaches the waiting long-poll first; the write that follows is off its critical path."""
    seen: list[bool] = []
    waiter: asyncio.Task[Any] | None = None

    async def at_write() -> None:
        assert waiter is not None
        seen.append(waiter.done())

    futures = FuturesService(SlowFinishRepo(Repo(f"sqlite:///{tmp_path / 'gw.db'}"), at_write), Metrics())
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    waiter = asyncio.create_task(futures.wait("t", fut.request_id, timeout=20))
    await asyncio.sleep(0.1)
    await futures.complete(fut, b'{"metrics": {}}', "application/json")
    assert seen == [True]
    assert (await waiter).state == FutureState.COMPLETE


async def test_a_waiter_that_comes_while_the_result_is_written_gets_it_without_waiting_out_its_poll(
        tmp_path: Path) -> None:
    late: list[asyncio.Task[Any]] = []
    futures: FuturesService | None = None
    request_id = ""

    async def at_write() -> None:
        assert futures is not None
        late.append(asyncio.create_task(futures.wait("t", request_id, timeout=60)))
        await asyncio.sleep(0.2)  # it read a pending row and sleeps on the notifier now

    futures = FuturesService(SlowFinishRepo(Repo(f"sqlite:///{tmp_path / 'gw.db'}"), at_write), Metrics())
    fut, _ = await futures.create(tenant="t", session_id="s", target_id="m", seq_id=1, op="optim_step")
    request_id = fut.request_id
    first = asyncio.create_task(futures.wait("t", fut.request_id, timeout=60))
    await asyncio.sleep(0.1)
    await futures.complete(fut, b'{"metrics": {}}', "application/json")
    record = await asyncio.wait_for(late[0], 30)  # woken by the write, not after its 60 s poll
    assert record.state == FutureState.COMPLETE
    assert record.result == b'{"metrics": {}}' and (await first).state == FutureState.COMPLETE
