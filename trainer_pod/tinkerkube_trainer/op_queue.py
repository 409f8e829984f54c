"""The per-model op queue: strict seq order, idempotent resubmits, re-readable results, long-poll wakeups.

Everything here runs on the event loop thread (no locks); the only other thread is the single
executor that runs one op at a time on the model. Training ops are keyed by `seq_id` and run in that
order whatever order they arrive in (a gap waits to be filled); samples are keyed by `request_id`
and run between training ops, oldest submit first across both kinds. Results are never popped on
read: finished entries stay for `ttl` seconds (or until `max_retained` newer ones push them out).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from tinkerkube_contract.pod_api import ErrorCategory, OpFailure, OpKind, OpState
from tinkerkube_trainer.engine_api import OpError, OpOutput, PreparedOp

log = logging.getLogger(__name__)


class SeqIdReused(Exception):
    """A different op under a seq_id (or request_id) that is already taken."""


class SeqIdStale(Exception):
    """A seq_id this trainer has already moved past (and no longer remembers)."""


def fingerprint(kind: OpKind | str, body: bytes) -> str:
    """What makes two submits "the same op": the kind and the exact body bytes."""
    digest = hashlib.sha256(str(kind).encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


@dataclass(eq=False)
class Entry:
    key: int | str  # seq_id for training ops, request_id for samples
    kind: OpKind
    fingerprint: str
    prepared: PreparedOp | None
    order: int  # global submit order, for fairness between samples and training ops
    submitted_at: float
    state: OpState = OpState.PENDING
    running: bool = False
    output: OpOutput | None = None
    failure: OpFailure | None = None
    started_at: float | None = None
    finished_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the runner reports (e.g. token counts)

    @property
    def done(self) -> bool:
        return self.state is not OpState.PENDING

    @property
    def is_sample(self) -> bool:
        return self.kind is OpKind.SAMPLE


@dataclass(frozen=True, slots=True)
class RunResult:
    output: OpOutput
    extra: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[PreparedOp], "RunResult | OpOutput"]
FinishHook = Callable[[Entry], None]


class Notifier:
    """One shared wakeup for every long-poll waiter: each notify releases all current waiters, who
    then re-check their own entry. No waiter polls."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify_all(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class OpQueue:
    def __init__(
        self,
        *,
        run_training: Runner,
        run_sample: Runner,
        executor: Executor,
        next_seq: int = 1,
        ttl: float = 3600.0,
        max_retained: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        on_finish: FinishHook | None = None,
        idle_task: Callable[[], None] | None = None,
        idle_interval: float = 5.0,
    ) -> None:
        self._run_training = run_training
        self._run_sample = run_sample
        self._executor = executor
        self.next_seq = next_seq
        self.first_seq = next_seq  # what this boot started from (earlier seq ids are unknown here)
        self.last_finished_seq: int | None = next_seq - 1
        self._ttl = ttl
        self._max_retained = max_retained
        self._clock = clock
        self._on_finish = on_finish
        self._idle_task = idle_task  # run on the executor after `idle_interval` s with nothing to do
        self._idle_interval = idle_interval
        self._ops: dict[int, Entry] = {}
        self._samples: dict[str, Entry] = {}
        self._pending_samples: deque[Entry] = deque()
        self._finished: deque[Entry] = deque()  # in finish order, for TTL pruning
        self._order = itertools.count()
        self.notifier = Notifier()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self.running: Entry | None = None

    # ---- lookups -------------------------------------------------------------------------------

    def get_op(self, seq_id: int) -> Entry | None:
        self._prune()
        return self._ops.get(seq_id)

    def get_sample(self, request_id: str) -> Entry | None:
        self._prune()
        return self._samples.get(request_id)

    def check_op(self, seq_id: int, fp: str) -> Entry | None:
        """The existing entry for an identical resubmit, None for a new seq_id; raises for misuse."""
        entry = self.get_op(seq_id)
        if entry is not None:
            if entry.fingerprint != fp:
                raise SeqIdReused(f"seq_id {seq_id} was already used for a different {entry.kind} op")
            return entry
        if seq_id < self.next_seq:
            raise SeqIdStale(
                f"seq_id {seq_id} is behind this trainer (next expected {self.next_seq}); "
                "it already ran or predates the restored state")
        return None

    def check_sample(self, request_id: str, fp: str) -> Entry | None:
        entry = self.get_sample(request_id)
        if entry is not None and entry.fingerprint != fp:
            raise SeqIdReused(f"request_id {request_id!r} was already used for a different sample")
        return entry

    # ---- submits -------------------------------------------------------------------------------

    def submit_op(self, seq_id: int, kind: OpKind, fp: str, prepared: PreparedOp) -> Entry:
        existing = self.check_op(seq_id, fp)
        if existing is not None:
            return existing
        entry = Entry(seq_id, kind, fp, prepared, next(self._order), self._clock())
        self._ops[seq_id] = entry
        self._wake.set()
        return entry

    def submit_sample(self, request_id: str, fp: str, prepared: PreparedOp) -> Entry:
        existing = self.check_sample(request_id, fp)
        if existing is not None:
            return existing
        entry = Entry(request_id, OpKind.SAMPLE, fp, prepared, next(self._order), self._clock())
        self._samples[request_id] = entry
        self._pending_samples.append(entry)
        self._wake.set()
        return entry

    # ---- state ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Ops submitted and not finished (running included)."""
        ops = sum(1 for seq in self._ops if seq >= self.next_seq)  # a running op is still at next_seq
        sample_running = 1 if self.running is not None and self.running.is_sample else 0
        return ops + len(self._pending_samples) + sample_running

    def position(self, entry: Entry) -> int | None:
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
        return max(0, int(entry.key) - self.next_seq)

    async def wait(self, entry: Entry, timeout: float) -> Entry:
        """Until `entry` finishes or `timeout` passes; returns it either way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not entry.done:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self.notifier.wait(remaining)
        return entry

    # ---- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="op-queue-worker")

    async def stop(self) -> None:
        """Finish the running op (if any), run nothing more."""
        self._stopping = True
        self._wake.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _next_entry(self) -> Entry | None:
        op = self._ops.get(self.next_seq)
        sample = self._pending_samples[0] if self._pending_samples else None
        if op is not None and (sample is None or op.order < sample.order):
            return op
        if sample is not None:
            self._pending_samples.popleft()
            return sample
        return None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            entry = self._next_entry()
            if entry is None:
                self._wake.clear()
                if self._idle_task is None:
                    await self._wake.wait()
                else:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._idle_interval)
                    except TimeoutError:
                        try:
                            await loop.run_in_executor(self._executor, self._idle_task)
                        except Exception:
                            log.exception("idle task failed")
                continue
            self.running = entry
            entry.running = True
            entry.started_at = self._clock()
            runner = self._run_sample if entry.is_sample else self._run_training
            outcome = await loop.run_in_executor(self._executor, _invoke, runner, entry.prepared)
            self._finish(entry, outcome)

    def _finish(self, entry: Entry, outcome: RunResult | OpFailure) -> None:
        entry.running = False
        entry.finished_at = self._clock()
        entry.prepared = None  # the decoded request is no longer needed; keep memory to the results
        if isinstance(outcome, OpFailure):
            entry.state, entry.failure = OpState.FAILED, outcome
        else:
            entry.state, entry.output, entry.extra = OpState.COMPLETE, outcome.output, outcome.extra
        if not entry.is_sample:
            self.next_seq = int(entry.key) + 1
            self.last_finished_seq = int(entry.key)
        self.running = None
        self._finished.append(entry)
        self._prune()
        if self._on_finish is not None:
            try:
                self._on_finish(entry)
            except Exception:  # metrics must never break the queue
                log.exception("on_finish hook failed")
        self.notifier.notify_all()

    def _prune(self) -> None:
        horizon = self._clock() - self._ttl
        while self._finished and (
            len(self._finished) > self._max_retained or (self._finished[0].finished_at or 0.0) < horizon
        ):
            old = self._finished.popleft()
            table: dict[Any, Entry] = self._samples if old.is_sample else self._ops  # type: ignore[assignment]
            if table.get(old.key) is old:
                del table[old.key]


def _invoke(runner: Runner, prepared: PreparedOp | None) -> RunResult | OpFailure:
    """Runs on the executor thread. OpError → the op failed with its category; anything else the
    runner lets through → a server failure (runners that must not survive an error exit instead)."""
    assert prepared is not None
    try:
        result = runner(prepared)
    except OpError as exc:
        return OpFailure(error=exc.message, category=exc.category)
    except Exception as exc:
        log.exception("op failed", extra={"op": str(prepared.kind)})
        return OpFailure(error=f"internal error: {type(exc).__name__}: {exc}", category=ErrorCategory.SERVER)
    return result if isinstance(result, RunResult) else RunResult(result)
