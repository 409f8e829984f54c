"""The pool's scheduler: which ops run together, in which order, on the one op thread.

A pass is a group of ops the engine runs at once. Rules, in the order they apply:
1. Attaching and detaching a run are passes of their own (every rank builds or drops its state).
2. Training and sampling alternate by age: whichever kind has the oldest waiting op goes next.
3. A training pass takes the next op (strict seq order) of every run that has one, at most one op
   per run, visiting runs in round-robin order from the one served least recently; forward/backward
   ops join while the pass stays within `max_pass_tokens` (the first always joins). Runs left out go
   first next time. Fair means: every run with a ready op is served once per pass or, when the
   token budget is reached, first in the next one; no run can be starved by a busier one.
4. A sampling pass takes waiting samples oldest first (any runs, base-model samples too) up to
   `max_sample_rows` sequences, decoded together on rank 0 alone (on every rank in lockstep when the
   base is sharded). Samples that arrive while it decodes
   join it at the next step (continuous batching) as long as rows are free and no training op waits;
   each sample is answered as soon as its sequences are done.

Everything here runs on the event loop thread except the passes themselves (on the executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from tinkerkube_contract.pod_api import ErrorCategory, OpFailure, OpKind, RunSpec, RunState
from tinkerkube_trainer.engine_api import OpError, OpOutput, PoolOpKind, PreparedOp
from tinkerkube_trainer.progress_reads import ProgressReads
from tinkerkube_trainer.run_queue import (
    Entry,
    Notifier,
    Retention,
    RunConflict,
    RunQueue,
    RunSlot,
    RunUnavailable,
    SeqIdReused,
    wait_event,
)
from tinkerkube_trainer.sample_feed import CANCELLED, SampleFeed, run_sampling_pass, sample_rows
from tinkerkube_trainer.sample_progress import Progress

log = logging.getLogger(__name__)

PassRunner = Callable[[list[PreparedOp]], list["OpOutput | OpError"]]
SampleRunner = Callable[["SampleFeed"], None]
FinishHook = Callable[[Entry], None]


@dataclass(frozen=True, slots=True)
class Limits:
    max_runs: int = 8
    max_pass_tokens: int = 65_536
    max_sample_rows: int = 64
    ttl: float = 3600.0
    max_retained: int = 100_000


class Scheduler:
    def __init__(self, *, run_training: PassRunner, run_sample: SampleRunner, executor: Executor,
                 limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic,
                 on_finish: FinishHook | None = None, on_pass: Callable[[str, int], None] | None = None,
                 idle_task: Callable[[], None] | None = None, idle_interval: float = 5.0,
                 new_id: Callable[[], str] | None = None) -> None:
        self._run_training, self._run_sample = run_training, run_sample
        self._executor = executor
        self.limits = limits
        self._clock = clock
        self._on_finish, self._on_pass = on_finish, on_pass
        self._idle_task, self._idle_interval = idle_task, idle_interval
        self._ids = itertools.count(1)
        self._new_id = new_id or (lambda: f"attach-{next(self._ids)}")
        self.slots: dict[str, RunSlot] = {}
        self._rr: deque[str] = deque()  # runs in round-robin order, least recently served first
        self._control: deque[Entry] = deque()
        self._samples: dict[str, Entry] = {}
        self._pending_samples: deque[Entry] = deque()
        self._sample_retention = Retention(self._samples, limits.ttl, limits.max_retained)
        self._order = itertools.count()
        self.notifier = Notifier()
        self.progress = ProgressReads()  # streaming reads of running samples
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self.running: list[Entry] = []
        self._feed: SampleFeed | None = None  # the sampling pass now decoding, while it takes joiners

    # ---- runs ----------------------------------------------------------------------------------

    def attach(self, spec: RunSpec, prepared: PreparedOp) -> RunSlot:
        """Idempotent for the same spec; a failed attach is tried again. Raises RunConflict, or
        RunUnavailable when the pool is full."""
        slot = self.slots.get(spec.model_id)
        if slot is not None and slot.detaching:
            raise RunUnavailable(f"run {spec.model_id!r} is being detached; retry shortly", retryable=True)
        if slot is not None and slot.state is not RunState.FAILED:
            if slot.spec != spec:
                raise RunConflict(f"run {spec.model_id!r} is attached with a different spec; detach it first")
            return slot
        if slot is None and sum(not s.detaching for s in self.slots.values()) >= self.limits.max_runs:
            raise RunUnavailable(f"this pool holds its maximum of {self.limits.max_runs} runs", retryable=True)
        slot = RunSlot(spec, self._new_id())
        self.slots[spec.model_id] = slot
        self._control.append(self._entry(spec.model_id, PoolOpKind.ATTACH, prepared))
        self._wake.set()
        return slot

    def detach(self, model_id: str, prepared: PreparedOp) -> None:
        slot = self.slots.get(model_id)
        if slot is None or slot.detaching:
            return
        slot.detaching = True
        for entry in slot.queue.pending() if slot.queue else []:
            if not entry.running:
                self._finish(entry, OpFailure(error=f"run {model_id} was detached from its trainer pool",
                                              category=ErrorCategory.USER), notify=False)
        self._control.append(self._entry(model_id, PoolOpKind.DETACH, prepared))
        self._wake.set()
        self.notifier.notify_all()

    def queue(self, model_id: str) -> RunQueue:
        slot = self.slots.get(model_id)
        if slot is None or slot.detaching:
            raise RunUnavailable(f"no run {model_id!r} is attached to this pool", retryable=False)
        if slot.state is RunState.FAILED:
            raise RunUnavailable(f"run {model_id!r} failed to attach: {slot.error}", retryable=False)
        if slot.queue is None:
            raise RunUnavailable(f"run {model_id!r} is still attaching; retry shortly", retryable=True)
        return slot.queue

    async def wait_slot(self, slot: RunSlot, timeout: float) -> RunSlot:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while slot.state is RunState.ATTACHING and (remaining := deadline - loop.time()) > 0:
            await self.notifier.wait(remaining)
        return slot

    # ---- submits -------------------------------------------------------------------------------

    def _entry(self, key: int | str, kind: OpKind | PoolOpKind, prepared: PreparedOp, fp: str = "") -> Entry:
        return Entry(key, kind, fp, prepared, next(self._order), self._clock())

    def submit_op(self, model_id: str, seq_id: int, kind: OpKind, fp: str, prepared: PreparedOp) -> Entry:
        queue = self.queue(model_id)
        existing = queue.check(seq_id, fp)
        if existing is not None:
            return existing
        entry = self._entry(seq_id, kind, prepared, fp)
        queue.add(entry)
        self._wake.set()
        return entry

    def check_sample(self, request_id: str, fp: str) -> Entry | None:
        entry = self.get_sample(request_id)
        if entry is not None and entry.fingerprint != fp:
            raise SeqIdReused(f"request_id {request_id!r} was already used for a different sample")
        return entry

    def submit_sample(self, request_id: str, fp: str, prepared: PreparedOp) -> Entry:
        existing = self.check_sample(request_id, fp)
        if existing is not None:
            return existing
        entry = self._entry(request_id, OpKind.SAMPLE, prepared, fp)
        entry.progress = Progress()
        self._samples[request_id] = entry
        if self._feed is not None and not self._control and not self._heads() and self._feed.offer(entry):
            entry.running, entry.started_at = True, self._clock()  # joins the decode under way
            self.running.append(entry)
            return entry
        self._pending_samples.append(entry)
        self._wake.set()
        return entry

    def get_sample(self, request_id: str) -> Entry | None:
        self._sample_retention.prune(self._clock())
        return self._samples.get(request_id)

    def cancel_sample(self, request_id: str) -> Entry | None:
        """Stop a sample: one still waiting fails now; a running one is marked, and its decode drops its
        rows at the next step (then it fails as cancelled). A finished one stays as it was."""
        entry = self.get_sample(request_id)
        if entry is None or entry.done:
            return entry
        if entry in self._pending_samples:
            self._pending_samples.remove(entry)
            self._finish(entry, OpFailure(error=CANCELLED, category=ErrorCategory.USER))
        elif entry.progress is not None:
            entry.progress.cancelled = True
        return entry

    # ---- state ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Ops submitted and not finished (running included)."""
        ops = sum(s.queue.depth for s in self.slots.values() if s.queue is not None)
        samples = len(self._pending_samples) + sum(1 for e in self.running if e.is_sample)
        return ops + samples + len(self._control)

    def position(self, entry: Entry, queue: RunQueue | None = None) -> int | None:
        """0 = running or next to run; None when finished."""
        if entry.done:
            return None
        if entry.running:
            return 0
        if entry.is_sample:
            try:
                return self._pending_samples.index(entry)
            except ValueError:
                return None
        return None if queue is None else queue.position(entry)

    async def wait(self, entry: Entry, timeout: float) -> Entry:
        """Until `entry` finishes or `timeout` passes; returns it either way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not entry.done and (remaining := deadline - loop.time()) > 0:
            await self.notifier.wait(remaining)
        return entry

    # ---- pass selection (pure over the queues) ---------------------------------------------------

    def next_pass(self) -> list[Entry]:
        if self._control:
            return [self._control.popleft()]
        heads = self._heads()
        oldest_training = min((e.order for e in heads), default=None)
        if self._pending_samples and (oldest_training is None or self._pending_samples[0].order < oldest_training):
            return self._sample_pass()
        return self._training_pass(heads)

    def _heads(self) -> list[Entry]:
        out = []
        for model_id in self._rr:
            slot = self.slots.get(model_id)
            head = slot.queue.head() if slot is not None and slot.queue is not None and not slot.detaching else None
            if head is not None:
                out.append(head)
        return out

    def _training_pass(self, heads: Sequence[Entry]) -> list[Entry]:
        chosen: list[Entry] = []
        tokens = 0
        for head in heads:
            cost = _tokens(head)
            if head.kind is OpKind.FORWARD_BACKWARD and chosen and tokens + cost > self.limits.max_pass_tokens:
                continue
            tokens += cost
            chosen.append(head)
        for entry in chosen:  # served: to the back of the round
            self._rr.remove(str(entry.model_id))
            self._rr.append(str(entry.model_id))
        return chosen

    def _sample_pass(self) -> list[Entry]:
        chosen: list[Entry] = []
        rows = 0
        while self._pending_samples:
            entry = self._pending_samples[0]
            n = sample_rows(entry)
            if chosen and rows + n > self.limits.max_sample_rows:
                break
            chosen.append(self._pending_samples.popleft())
            rows += n
        return chosen

    # ---- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="pool-scheduler")

    async def stop(self) -> None:
        """Finish the running pass (if any), run nothing more."""
        self._stopping = True
        self._wake.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _idle(self) -> None:
        self._wake.clear()
        if self._idle_task is None:
            await self._wake.wait()
            return
        if await wait_event(self._wake, self._idle_interval):
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._idle_task)
        except Exception:
            log.exception("idle task failed")

    async def _work(self) -> None:
        while not self._stopping:
            entries = self.next_pass()
            if not entries:
                await self._idle()
                continue
            now = self._clock()
            for entry in entries:
                entry.running, entry.started_at = True, now
            self.running = list(entries)
            if entries[0].is_sample:
                await self._sample_pass_run(entries)
            else:
                await self._training_pass_run(entries)
            self.running = []

    async def _training_pass_run(self, entries: list[Entry]) -> None:
        ops = [e.prepared for e in entries]
        outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, _invoke, self._run_training, ops)
        if self._on_pass is not None:
            self._on_pass("train", len(entries))
        for entry, outcome in zip(entries, outcomes, strict=True):
            self._finish(entry, outcome, notify=False)
        self.notifier.notify_all()

    async def _sample_pass_run(self, entries: list[Entry]) -> None:
        loop = asyncio.get_running_loop()
        feed = self._feed = SampleFeed(loop, self._finish, self.limits.max_sample_rows,
                                       on_step=self.progress.notify_all, watched=self.progress.watched)
        for entry in entries:
            feed.offer(entry)
        try:
            await loop.run_in_executor(self._executor, run_sampling_pass, self._run_sample, feed)
        finally:
            self._feed = None
            for entry in reversed(feed.close()):  # offered too late: first in line for the next pass
                entry.running, entry.started_at = False, None
                self._pending_samples.appendleft(entry)
        if self._on_pass is not None:
            self._on_pass("sample", feed.served)

    def _finish(self, entry: Entry, outcome: OpOutput | OpFailure, *, notify: bool = True) -> None:
        model_id = entry.model_id
        if entry in self.running:
            self.running.remove(entry)
        entry.finish(outcome, self._clock())
        if entry.kind in (PoolOpKind.ATTACH, PoolOpKind.DETACH):
            self._control_done(str(entry.key), entry)
        elif entry.is_sample:
            self._sample_retention.add(entry)
            self._sample_retention.prune(self._clock())
            self.progress.notify_all()
        else:
            slot = self.slots.get(str(model_id))
            if slot is not None and slot.queue is not None:
                slot.queue.finished(entry)
        if self._on_finish is not None:
            try:
                self._on_finish(entry)
            except Exception:  # metrics must never break the scheduler
                log.exception("on_finish hook failed")
        if notify:
            self.notifier.notify_all()

    def _control_done(self, model_id: str, entry: Entry) -> None:
        slot = self.slots.get(model_id)
        if slot is None:
            return
        if entry.kind is PoolOpKind.DETACH:
            del self.slots[model_id]
            with contextlib.suppress(ValueError):
                self._rr.remove(model_id)
            return
        if entry.failure is not None:
            slot.state, slot.error = RunState.FAILED, entry.failure.error
            return
        slot.info = json.loads(entry.output.body) if entry.output is not None and entry.output.body else {}
        last = int(slot.info.get("last_completed_seq_id") or 0)
        slot.queue = RunQueue(model_id, next_seq=last + 1, ttl=self.limits.ttl,
                              max_retained=self.limits.max_retained, clock=self._clock)
        slot.state = RunState.READY
        self._rr.append(model_id)


def _tokens(entry: Entry) -> int:
    payload = entry.prepared.payload if entry.prepared is not None else None
    return int(getattr(payload, "num_tokens", 0) or 0)


def _invoke(runner: PassRunner, ops: list[PreparedOp | None]) -> list[OpOutput | OpFailure]:
    """Runs on the executor thread. OpError → that op failed with its category; anything the runner
    lets through fails the whole pass as a server failure (runners that must not survive an error
    exit instead)."""
    try:
        outcomes = runner([op for op in ops if op is not None])
    except Exception as exc:
        log.exception("pass failed", extra={"ops": [str(op.kind) for op in ops if op is not None]})
        failure = OpFailure(error=f"internal error: {type(exc).__name__}: {exc}", category=ErrorCategory.SERVER)
        return [failure] * len(ops)
    return [OpFailure(error=o.message, category=o.category) if isinstance(o, OpError) else o for o in outcomes]
