"""The pool scheduler alone: per-run order, gaps, idempotency, retention, co-batched passes, fairness,
samples batched together, attach/detach, the shared notifier. Passes run on a real executor thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from tinkerkube_contract.pod_api import ErrorCategory, OpKind, OpState, RunSpec, RunState
from tinkerkube_trainer.engine_api import OpError, OpOutput, PoolOpKind, PreparedOp
from tinkerkube_trainer.run_queue import Entry, RunConflict, RunUnavailable, SeqIdReused, SeqIdStale, fingerprint
from tinkerkube_trainer.scheduler import Limits, Scheduler

FB = OpKind.FORWARD_BACKWARD


@dataclass(frozen=True)
class Work:
    """A stand-in payload: a label, and what the scheduler reads for its budgets."""

    label: str
    num_tokens: int = 10


@dataclass(frozen=True)
class Params:
    num_samples: int


@dataclass(frozen=True)
class SampleWork:
    label: str
    params: Params


class Recorder:
    """A pass runner that records each pass (on the executor thread) and can be held closed."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.next_seq = {"m": 1}

    @property
    def ran(self) -> list[str]:
        return [label for p in self.passes for label in p if not label.startswith("attach:")]

    def run_samples(self, feed: Any) -> None:
        """A sampling pass: decodes what the feed hands over, also what joins while it runs."""
        labels: list[str] = []
        self.passes.append(labels)  # recorded before any answer: answers go out as soon as they are done
        while taken := feed.poll():
            assert self.gate.wait(10), "gate never opened"
            for key, op in taken:
                labels.append(op.payload.label)
                feed.done(key, OpOutput("application/json", json.dumps({"ran": op.payload.label}).encode()))

    def run(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        assert self.gate.wait(10), "gate never opened"
        out: list[OpOutput | OpError] = []
        labels = []
        for op in ops:
            if op.kind is PoolOpKind.ATTACH:
                spec: RunSpec = op.payload
                if spec.restore_from == "broken":
                    out.append(OpError("cannot read it", code="checkpoint_not_found"))
                    continue
                last = self.next_seq.get(spec.model_id, 1) - 1
                out.append(OpOutput("application/json", json.dumps({"last_completed_seq_id": last}).encode()))
                labels.append(f"attach:{spec.model_id}")
                continue
            if op.kind is PoolOpKind.DETACH:
                out.append(OpOutput("application/json", b"{}"))
                continue
            label = op.payload.label
            if label.endswith("user-error"):
                out.append(OpError("bad input", code="bad"))
                continue
            if label.endswith("boom"):
                raise RuntimeError("boom")
            labels.append(label)
            out.append(OpOutput("application/json", json.dumps({"ran": label}).encode()))
        self.passes.append(labels)
        return out


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


async def make(recorder: Recorder, clock: Clock | None = None, **limits: int | float) -> Scheduler:
    s = Scheduler(run_training=recorder.run, run_sample=recorder.run_samples, executor=ThreadPoolExecutor(1),
                  limits=Limits(**{"ttl": 60, "max_retained": 100, **limits}), clock=clock or Clock())
    s.start()
    return s


@pytest.fixture
async def sched(recorder: Recorder, clock: Clock) -> AsyncIterator[Scheduler]:
    s = await make(recorder, clock)
    await attach(s, "m")
    yield s
    recorder.gate.set()
    await s.stop()


async def attach(s: Scheduler, model_id: str, *, restore_from: str | None = None) -> None:
    spec = RunSpec(model_id=model_id, base_model="b", restore_from=restore_from)
    slot = s.attach(spec, PreparedOp(PoolOpKind.ATTACH, spec, model_id))
    await s.wait_slot(slot, 5)


def submit(s: Scheduler, seq: int, label: str = "", kind: OpKind = OpKind.OPTIM_STEP, model_id: str = "m",
           tokens: int = 10) -> Entry:
    label = label or f"{model_id}:op{seq}"
    return s.submit_op(model_id, seq, kind, fingerprint(kind, label.encode()),
                       PreparedOp(kind, Work(label, tokens), model_id))


def sample(s: Scheduler, request_id: str, label: str = "", n: int = 1) -> Entry:
    label = label or f"s-{request_id}"
    return s.submit_sample(request_id, fingerprint(OpKind.SAMPLE, label.encode()),
                           PreparedOp(OpKind.SAMPLE, SampleWork(label, Params(n)), None))


async def done(s: Scheduler, *entries: Entry) -> None:
    for entry in entries:
        await s.wait(entry, 5)
        assert entry.done, f"{entry.key} still pending"


async def test_ops_arriving_out_of_order_run_in_seq_order(sched: Scheduler, recorder: Recorder) -> None:
    entries = [submit(sched, s) for s in (3, 2, 5, 1, 4)]
    await done(sched, *entries)
    assert recorder.ran == ["m:op1", "m:op2", "m:op3", "m:op4", "m:op5"]
    assert sched.queue("m").next_seq == 6


async def test_a_gap_holds_later_ops_until_it_is_filled(sched: Scheduler, recorder: Recorder) -> None:
    first, third = submit(sched, 1), submit(sched, 3)
    await done(sched, first)
    await sched.wait(third, 0.2)
    queue = sched.queue("m")
    assert third.state is OpState.PENDING and sched.position(third, queue) == 1
    assert sched.depth == 1
    second = submit(sched, 2)
    await done(sched, second, third)
    assert recorder.ran == ["m:op1", "m:op2", "m:op3"] and sched.depth == 0


async def test_identical_resubmit_returns_the_same_entry_and_runs_once(sched: Scheduler, recorder: Recorder) -> None:
    a = submit(sched, 1, "same")
    assert submit(sched, 1, "same") is a
    await done(sched, a)
    again = submit(sched, 1, "same")  # after completion: still the original result
    assert again is a and again.state is OpState.COMPLETE and recorder.ran == ["same"]


async def test_a_different_op_under_a_used_seq_id_is_rejected(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(sched, 1, "original")
    with pytest.raises(SeqIdReused):
        submit(sched, 1, "other")
    with pytest.raises(SeqIdReused):
        submit(sched, 1, "original", kind=OpKind.SAVE_STATE)  # same body, other kind
    recorder.gate.set()
    await done(sched, entry)
    with pytest.raises(SeqIdReused):
        submit(sched, 1, "other")
    assert recorder.ran == ["original"]


async def test_a_run_restored_at_seq_10_starts_at_11(recorder: Recorder) -> None:
    recorder.next_seq["r"] = 11
    s = await make(recorder)
    try:
        await attach(s, "r")
        with pytest.raises(SeqIdStale):
            submit(s, 10, model_id="r")
        entry = submit(s, 11, model_id="r")
        await done(s, entry)
        assert s.queue("r").last_finished_seq == 11
    finally:
        await s.stop()


async def test_results_stay_readable_until_the_ttl(sched: Scheduler, clock: Clock) -> None:
    entry = submit(sched, 1)
    await done(sched, entry)
    queue = sched.queue("m")
    assert queue.get(1) is entry and entry.output is not None
    clock.now += 59
    assert queue.get(1) is entry
    clock.now += 2
    assert queue.get(1) is None
    with pytest.raises(SeqIdStale):  # forgotten, and behind the queue: cannot run again
        submit(sched, 1)


async def test_retention_is_capped_oldest_first(recorder: Recorder) -> None:
    s = await make(recorder, max_retained=3)
    try:
        await attach(s, "m")
        entries = [submit(s, seq) for seq in range(1, 6)]
        await done(s, *entries)
        assert [s.queue("m").get(seq) is not None for seq in range(1, 6)] == [False, False, True, True, True]
    finally:
        await s.stop()


async def test_one_completion_wakes_every_waiter(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(sched, 1)
    waiters = [asyncio.create_task(sched.wait(entry, 5)) for _ in range(50)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    recorder.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert all(r is entry and r.state is OpState.COMPLETE for r in results)


async def test_a_long_poll_returns_pending_when_its_time_is_up(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    entry = submit(sched, 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sched.wait(entry, 0.2)
    assert loop.time() - started >= 0.15
    assert entry.state is OpState.PENDING and sched.position(entry, sched.queue("m")) == 0


async def test_failures_keep_their_category_and_the_run_goes_on(sched: Scheduler, recorder: Recorder) -> None:
    bad, crashed, fine = submit(sched, 1, "user-error"), submit(sched, 2, "boom"), submit(sched, 3)
    await done(sched, bad, crashed, fine)
    assert bad.state is OpState.FAILED and bad.failure and bad.failure.category is ErrorCategory.USER
    assert crashed.state is OpState.FAILED and crashed.failure
    assert crashed.failure.category is ErrorCategory.SERVER and "boom" in crashed.failure.error
    assert fine.state is OpState.COMPLETE and recorder.ran == ["m:op3"]


async def test_ready_ops_of_several_runs_share_one_pass(sched: Scheduler, recorder: Recorder) -> None:
    await attach(sched, "a")
    await attach(sched, "b")
    recorder.gate.clear()
    blocker = submit(sched, 1, "blocker")
    await asyncio.sleep(0.05)  # running: what follows waits and is co-batched
    entries = [submit(sched, 1, model_id="a", kind=FB), submit(sched, 1, model_id="b", kind=FB),
               submit(sched, 2, model_id="m", kind=FB), submit(sched, 2, model_id="a")]
    recorder.gate.set()
    await done(sched, blocker, *entries)
    # one op per run per pass, runs in round-robin order (m was served last, so it goes last)
    assert recorder.passes[-2:] == [["a:op1", "b:op1", "m:op2"], ["a:op2"]]


async def test_a_busy_run_cannot_starve_another(recorder: Recorder) -> None:
    s = await make(recorder, max_pass_tokens=100)
    try:
        for model_id in ("busy", "quiet"):
            await attach(s, model_id)
        recorder.gate.clear()
        blocker = submit(s, 1, "blocker", model_id="busy", kind=FB, tokens=80)
        await asyncio.sleep(0.05)
        busy = [submit(s, seq, model_id="busy", kind=FB, tokens=80) for seq in range(2, 6)]
        quiet = [submit(s, seq, model_id="quiet", kind=FB, tokens=80) for seq in range(1, 3)]
        recorder.gate.set()
        await done(s, blocker, *busy, *quiet)
        # over the token budget, runs alternate: the run served least recently goes first
        assert recorder.ran[:5] == ["blocker", "quiet:op1", "busy:op2", "quiet:op2", "busy:op3"]
    finally:
        await s.stop()


async def test_samples_join_the_running_decode_within_the_row_budget(recorder: Recorder) -> None:
    s = await make(recorder, max_sample_rows=8)
    try:
        await attach(s, "m")
        recorder.gate.clear()
        first = sample(s, "first")
        await asyncio.sleep(0.05)  # its pass is decoding
        rest = [sample(s, name, n=3) for name in ("a", "b", "c")]
        assert s.depth == 4
        recorder.gate.set()
        await done(s, first, *rest)
        # a and b join the running decode (1 + 3 + 3 rows <= 8); c does not fit and waits for the next pass
        assert recorder.passes[-2:] == [["s-first", "s-a", "s-b"], ["s-c"]]
    finally:
        await s.stop()


async def test_a_waiting_training_op_stops_samples_joining(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    first = sample(sched, "first")
    await asyncio.sleep(0.05)
    op = submit(sched, 1)
    late = sample(sched, "late")  # the training op is older: it goes next, the late sample after it
    recorder.gate.set()
    await done(sched, first, op, late)
    assert recorder.passes[-3:] == [["s-first"], ["m:op1"], ["s-late"]]


async def test_samples_and_training_alternate_by_age(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    entries = [submit(sched, 1), sample(sched, "a"), submit(sched, 3), sample(sched, "b"), submit(sched, 2)]
    assert sched.depth == 5
    recorder.gate.set()
    await done(sched, *entries)
    assert recorder.ran == ["m:op1", "s-a", "s-b", "m:op2", "m:op3"]


async def test_sample_resubmit_is_idempotent_and_reuse_is_rejected(sched: Scheduler, recorder: Recorder) -> None:
    a = sample(sched, "r1", "p")
    assert sample(sched, "r1", "p") is a
    with pytest.raises(SeqIdReused):
        sample(sched, "r1", "q")
    await done(sched, a)
    assert sched.get_sample("r1") is a and recorder.ran == ["p"]


async def test_attach_is_idempotent_bounded_and_refuses_another_spec(recorder: Recorder) -> None:
    s = await make(recorder, max_runs=2)
    try:
        await attach(s, "a")
        await attach(s, "a")  # the same spec again: the same run
        assert recorder.passes.count(["attach:a"]) == 1
        other = RunSpec(model_id="a", base_model="b", restore_optimizer=True)
        with pytest.raises(RunConflict):
            s.attach(other, PreparedOp(PoolOpKind.ATTACH, other, "a"))
        await attach(s, "b")
        third = RunSpec(model_id="c", base_model="b")
        with pytest.raises(RunUnavailable, match="maximum of 2 runs"):
            s.attach(third, PreparedOp(PoolOpKind.ATTACH, third, "c"))
    finally:
        await s.stop()


async def test_a_failed_attach_says_why_and_can_be_tried_again(recorder: Recorder) -> None:
    s = await make(recorder)
    try:
        await attach(s, "x", restore_from="broken")
        assert s.slots["x"].state is RunState.FAILED and "cannot read it" in str(s.slots["x"].error)
        with pytest.raises(RunUnavailable) as err:
            submit(s, 1, model_id="x")
        assert not err.value.retryable
        await attach(s, "x")
        assert s.slots["x"].state is RunState.READY
    finally:
        await s.stop()


async def test_detach_fails_waiting_ops_and_frees_the_slot(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    running, waiting = submit(sched, 1), submit(sched, 2)
    await asyncio.sleep(0.05)
    sched.detach("m", PreparedOp(PoolOpKind.DETACH, None, "m"))
    assert waiting.state is OpState.FAILED and "detached" in str(waiting.failure)
    with pytest.raises(RunUnavailable):
        submit(sched, 3)
    recorder.gate.set()
    await done(sched, running)
    for _ in range(50):
        if "m" not in sched.slots:
            break
        await asyncio.sleep(0.02)
    assert "m" not in sched.slots and running.state is OpState.COMPLETE


async def test_a_failing_finish_hook_does_not_stall_the_scheduler(recorder: Recorder) -> None:
    def hook(_: Entry) -> None:
        raise ValueError("metrics broke")

    s = Scheduler(run_training=recorder.run, run_sample=recorder.run_samples, executor=ThreadPoolExecutor(1),
                  on_finish=hook)
    s.start()
    try:
        await attach(s, "m")
        entries = [submit(s, 1), submit(s, 2)]
        await done(s, *entries)
    finally:
        await s.stop()


async def test_stop_lets_the_running_pass_finish_and_runs_nothing_more(sched: Scheduler, recorder: Recorder) -> None:
    recorder.gate.clear()
    first, second = submit(sched, 1), submit(sched, 2)
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(sched.stop())
    await asyncio.sleep(0.05)
    recorder.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert first.state is OpState.COMPLETE and second.state is OpState.PENDING
