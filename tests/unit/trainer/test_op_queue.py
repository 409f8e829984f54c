"""The op queue alone: ordering, gaps, idempotency, seq reuse, retention, the shared notifier."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinkerkube_contract.pod_api import ErrorCategory, OpKind, OpState
from tinkerkube_trainer.engine_api import OpError, OpOutput, PreparedOp
from tinkerkube_trainer.op_queue import Entry, OpQueue, SeqIdReused, SeqIdStale, fingerprint


class Recorder:
    """Runners that record what ran (on the executor thread) and can be held closed."""

    def __init__(self) -> None:
        self.ran: list[object] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, op: PreparedOp) -> OpOutput:
        assert self.gate.wait(10), "gate never opened"
        if op.payload == "user-error":
            raise OpError("bad input", code="bad")
        if op.payload == "boom":
            raise RuntimeError("boom")
        self.ran.append(op.payload)
        return OpOutput("application/json", f'{{"ran": "{op.payload}"}}'.encode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def queue(recorder: Recorder, clock: Clock) -> AsyncIterator[OpQueue]:
    executor = ThreadPoolExecutor(1)
    q = OpQueue(run_training=recorder.run, run_sample=recorder.run, executor=executor, next_seq=1, ttl=60,
                max_retained=100, clock=clock)
    q.start()
    yield q
    recorder.gate.set()
    await q.stop()
    executor.shutdown(wait=True)


def submit(q: OpQueue, seq: int, payload: str = "", kind: OpKind = OpKind.OPTIM_STEP) -> Entry:
    payload = payload or f"op{seq}"
    return q.submit_op(seq, kind, fingerprint(kind, payload.encode()), PreparedOp(kind, payload))


def sample(q: OpQueue, request_id: str, payload: str = "") -> Entry:
    payload = payload or f"s-{request_id}"
    return q.submit_sample(request_id, fingerprint(OpKind.SAMPLE, payload.encode()), PreparedOp(OpKind.SAMPLE, payload))


async def done(q: OpQueue, *entries: Entry) -> None:
    for entry in entries:
        await q.wait(entry, 5)
        assert entry.done, f"{entry.key} still pending"


async def test_ops_arriving_out_of_order_run_in_seq_order(queue: OpQueue, recorder: Recorder) -> None:
    entries = [submit(queue, s) for s in (3, 2, 5, 1, 4)]
    await done(queue, *entries)
    assert recorder.ran == ["op1", "op2", "op3", "op4", "op5"]
    assert queue.next_seq == 6


async def test_a_gap_holds_later_ops_until_it_is_filled(queue: OpQueue, recorder: Recorder) -> None:
    first, third = submit(queue, 1), submit(queue, 3)
    await done(queue, first)
    await queue.wait(third, 0.2)
    assert third.state is OpState.PENDING and queue.position(third) == 1
    assert queue.depth == 1
    second = submit(queue, 2)
    await done(queue, second, third)
    assert recorder.ran == ["op1", "op2", "op3"]
    assert queue.depth == 0


async def test_identical_resubmit_returns_the_same_entry_and_runs_once(queue: OpQueue, recorder: Recorder) -> None:
    a = submit(queue, 1, "same")
    b = submit(queue, 1, "same")
    assert a is b
    await done(queue, a)
    c = submit(queue, 1, "same")  # after completion: still the original result
    assert c is a and c.state is OpState.COMPLETE
    assert recorder.ran == ["same"]


async def test_a_different_op_under_a_used_seq_id_is_rejected(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(queue, 1, "original")
    with pytest.raises(SeqIdReused):
        submit(queue, 1, "other")
    with pytest.raises(SeqIdReused):
        submit(queue, 1, "original", kind=OpKind.SAVE_STATE)  # same body, other kind
    recorder.gate.set()
    await done(queue, entry)
    with pytest.raises(SeqIdReused):
        submit(queue, 1, "other")
    assert recorder.ran == ["original"]


async def test_seq_ids_behind_the_start_point_are_stale(recorder: Recorder) -> None:
    executor = ThreadPoolExecutor(1)
    q = OpQueue(run_training=recorder.run, run_sample=recorder.run, executor=executor, next_seq=11)
    q.start()
    try:
        with pytest.raises(SeqIdStale):
            submit(q, 10)
        entry = submit(q, 11)
        await done(q, entry)
        assert q.last_finished_seq == 11
    finally:
        await q.stop()
        executor.shutdown()


async def test_results_stay_readable_until_the_ttl(queue: OpQueue, clock: Clock) -> None:
    entry = submit(queue, 1)
    await done(queue, entry)
    for _ in range(3):
        assert queue.get_op(1) is entry and entry.output is not None
    clock.now += 59
    assert queue.get_op(1) is entry
    clock.now += 2
    assert queue.get_op(1) is None
    with pytest.raises(SeqIdStale):  # forgotten, and behind the queue: cannot run again
        submit(queue, 1)


async def test_retention_is_capped_oldest_first(recorder: Recorder) -> None:
    executor = ThreadPoolExecutor(1)
    q = OpQueue(run_training=recorder.run, run_sample=recorder.run, executor=executor, max_retained=3)
    q.start()
    try:
        entries = [submit(q, s) for s in range(1, 6)]
        await done(q, *entries)
        assert [q.get_op(s) is not None for s in range(1, 6)] == [False, False, True, True, True]
    finally:
        await q.stop()
        executor.shutdown()


async def test_one_completion_wakes_every_waiter(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(queue, 1)
    waiters = [asyncio.create_task(queue.wait(entry, 5)) for _ in range(50)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    recorder.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert all(r is entry and r.state is OpState.COMPLETE for r in results)


async def test_queue_depth_counts_running_and_waiting_work_once(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    entries = [submit(queue, 1), submit(queue, 2)]
    await asyncio.sleep(0.05)  # seq 1 is running now
    assert queue.depth == 2
    entries.append(sample(queue, "s"))
    assert queue.depth == 3
    recorder.gate.set()
    await done(queue, *entries)
    assert queue.depth == 0


async def test_a_long_poll_returns_pending_when_its_time_is_up(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(queue, 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await queue.wait(entry, 0.2)
    assert 0.15 <= loop.time() - started < 2
    assert entry.state is OpState.PENDING and queue.position(entry) == 0


async def test_failures_keep_their_category_and_the_queue_goes_on(queue: OpQueue, recorder: Recorder) -> None:
    bad, crashed, fine = submit(queue, 1, "user-error"), submit(queue, 2, "boom"), submit(queue, 3)
    await done(queue, bad, crashed, fine)
    assert bad.state is OpState.FAILED and bad.failure and bad.failure.category is ErrorCategory.USER
    assert crashed.state is OpState.FAILED and crashed.failure
    assert crashed.failure.category is ErrorCategory.SERVER and "boom" in crashed.failure.error
    assert fine.state is OpState.COMPLETE and recorder.ran == ["op3"]


async def test_samples_run_between_training_ops_in_submit_order(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    entries = [submit(queue, 1), sample(queue, "a"), submit(queue, 3), sample(queue, "b"), submit(queue, 2)]
    assert queue.depth == 5
    recorder.gate.set()
    await done(queue, *entries)
    # seq 1 first; sample a (submitted before seq 2 arrived); seq 2 waits for nothing then, but sample b
    # was submitted before seq 2 too; seq 3 last (it had to wait for 2).
    assert recorder.ran == ["op1", "s-a", "s-b", "op2", "op3"]


async def test_sample_resubmit_is_idempotent_and_reuse_is_rejected(queue: OpQueue, recorder: Recorder) -> None:
    a = sample(queue, "r1", "p")
    assert sample(queue, "r1", "p") is a
    with pytest.raises(SeqIdReused):
        sample(queue, "r1", "q")
    await done(queue, a)
    assert queue.get_sample("r1") is a and recorder.ran == ["p"]


async def test_a_failing_finish_hook_does_not_stall_the_queue(recorder: Recorder) -> None:
    def hook(_: Entry) -> None:
        raise ValueError("metrics broke")

    executor = ThreadPoolExecutor(1)
    q = OpQueue(run_training=recorder.run, run_sample=recorder.run, executor=executor, on_finish=hook)
    q.start()
    try:
        entries = [submit(q, 1), submit(q, 2)]
        await done(q, *entries)
    finally:
        await q.stop()
        executor.shutdown()


async def test_stop_lets_the_running_op_finish_and_runs_nothing_more(queue: OpQueue, recorder: Recorder) -> None:
    recorder.gate.clear()
    first, second = submit(queue, 1), submit(queue, 2)
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(queue.stop())
    await asyncio.sleep(0.05)
    recorder.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert first.state is OpState.COMPLETE and second.state is OpState.PENDING
