"""One run's ops: strict seq order, idempotent resubmits, re-readable results. Pure bookkeeping.

Everything here runs on the event loop thread (no locks, no tasks); the scheduler decides when an
entry runs. Training ops are keyed by `seq_id` and become runnable strictly in that order, whatever
order they arrive in (a gap waits to be filled). Results are never popped on read: finished entries
stay for `ttl` seconds (or until `max_retained` newer ones push them out).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinkerkube_contract.pod_api import OpFailure, OpKind, OpState, RunSpec, RunState
from tinkerkube_trainer.engine_api import OpOutput, PoolOpKind, PreparedOp
from tinkerkube_trainer.sample_progress import Progress


class SeqIdReused(Exception):
    """A different op under a seq_id (or request_id) that is already taken."""


class SeqIdStale(Exception):
    """A seq_id this run has already moved past (and no longer remembers)."""


def fingerprint(kind: OpKind | PoolOpKind | str, body: bytes) -> str:
    """What makes two submits "the same op": the kind and the exact body bytes."""
    digest = hashlib.sha256(str(kind).encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


@dataclass(eq=False)
class Entry:
    key: int | str  # seq_id for training ops, request_id for samples, model_id for attach/detach
    kind: OpKind | PoolOpKind
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
    progress: Progress | None = None  # a sample's tokens so far, while it runs (streaming reads)

    @property
    def done(self) -> bool:
        return self.state is not OpState.PENDING

    @property
    def is_sample(self) -> bool:
        return self.kind is OpKind.SAMPLE

    @property
    def model_id(self) -> str | None:
        return None if self.prepared is None else self.prepared.model_id

    def finish(self, outcome: OpOutput | OpFailure, now: float) -> None:
        self.running = False
        self.finished_at = now
        self.prepared = None  # the decoded request is no longer needed; keep memory to the results
        self.progress = None  # the result holds every token now
        if isinstance(outcome, OpFailure):
            self.state, self.failure = OpState.FAILED, outcome
        else:
            self.state, self.output = OpState.COMPLETE, outcome


class Retention:
    """Finished entries of one table, pruned by age and count."""

    def __init__(self, table: dict[Any, Entry], ttl: float, max_retained: int) -> None:
        self.table, self.ttl, self.max_retained = table, ttl, max_retained
        self.finished: deque[Entry] = deque()

    def add(self, entry: Entry) -> None:
        self.finished.append(entry)

    def prune(self, now: float) -> None:
        horizon = now - self.ttl
        while self.finished and (len(self.finished) > self.max_retained
                                 or (self.finished[0].finished_at or 0.0) < horizon):
            old = self.finished.popleft()
            if self.table.get(old.key) is old:
                del self.table[old.key]


class RunQueue:
    """A run's ordered ops. `next_seq` is the seq_id that runs next; earlier ones are done."""

    def __init__(self, model_id: str, *, next_seq: int, ttl: float, max_retained: int,
                 clock: Callable[[], float]) -> None:
        self.model_id = model_id
        self.next_seq = next_seq
        self.first_seq = next_seq  # what this attachment started from (earlier seq ids are unknown here)
        self.last_finished_seq: int = next_seq - 1
        self.ops: dict[int, Entry] = {}
        self._clock = clock
        self._retained = Retention(self.ops, ttl, max_retained)

    def get(self, seq_id: int) -> Entry | None:
        self._retained.prune(self._clock())
        return self.ops.get(seq_id)

    def check(self, seq_id: int, fp: str) -> Entry | None:
        """The existing entry for an identical resubmit, None for a new seq_id; raises for misuse."""
        entry = self.get(seq_id)
        if entry is not None:
            if entry.fingerprint != fp:
                raise SeqIdReused(f"seq_id {seq_id} was already used for a different {entry.kind} op")
            return entry
        if seq_id < self.next_seq:
            raise SeqIdStale(
                f"seq_id {seq_id} is behind this run (next expected {self.next_seq}); "
                "it already ran or predates the restored state")
        return None

    def add(self, entry: Entry) -> None:
        self.ops[int(entry.key)] = entry

    def head(self) -> Entry | None:
        """The op that may run next (None while its seq_id has not arrived, or it is running)."""
        entry = self.ops.get(self.next_seq)
        return None if entry is None or entry.running or entry.done else entry

    @property
    def depth(self) -> int:
        """Ops submitted and not finished (running included)."""
        return sum(1 for seq in self.ops if seq >= self.next_seq)  # a running op is still at next_seq

    def position(self, entry: Entry) -> int | None:
        """0 = running or next to run; None when finished."""
        if entry.done:
            return None
        return 0 if entry.running else max(0, int(entry.key) - self.next_seq)

    def finished(self, entry: Entry) -> None:
        self.next_seq = int(entry.key) + 1
        self.last_finished_seq = int(entry.key)
        self._retained.add(entry)
        self._retained.prune(self._clock())

    def pending(self) -> list[Entry]:
        return [e for e in self.ops.values() if not e.done]


class Notifier:
    """One shared wakeup for every long-poll waiter: each notify releases all current waiters, who
    then re-check their own entry. No waiter polls."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify_all(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        return await wait_event(self._event, timeout)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True when `event` is set within `timeout`. Waits in the caller's task: asyncio.wait_for starts a
    task per wait on Python 3.11, one more loop hop on every wake-up (each long-poll's result on its way out)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class RunConflict(Exception):
    """A run with this model_id is attached with a different spec."""


class RunUnavailable(Exception):
    """The run is not attached (unknown, attaching, detaching or failed); `retryable` when waiting helps."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class RunSlot:
    spec: RunSpec
    attach_id: str
    state: RunState = RunState.ATTACHING
    error: str | None = None
    queue: RunQueue | None = None
    detaching: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # what the engine reported at attach
