"""ModelWorker: one trainer process group's ordered op stream.

It waits for the trainer's readiness (then completes the create future), forwards the contiguous run
of ops starting at the next expected SDK seq_id (`scheduling.forwardable`), and a poller long-polls
results in the same order. Woken by an Event on submit: no sleeping loop.

Two numberings: the SDK's `seq_id` orders ops; the trainer's `trainer_seq` is assigned at forwarding,
contiguously, and persisted first (the op log). An op the gateway or trainer rejects takes no trainer
seq, so the trainer's own ordered queue never waits on a gap.

Gaps: ops wait for every seq_id before theirs. When the next one has not arrived `gap_timeout` seconds
after ops began waiting behind it, the hole is sealed (its seq_ids are used up by failed futures, so a
late arrival is refused) and the ops that waited fail with a message naming it; later ops go on.

Crash recovery: when the trainer stops answering, the backend says whether it is gone (fail every
pending future clearly) or was recreated (a new `boot_id`): then the ops after the trainer's restore
point are replayed from the op log (`scheduling.replay_plan`), or failed with a retryable error.

Nothing here may end a loop with an exception: whatever goes wrong with one op (the store, the sink, a
trainer answer we cannot read) fails that op with a server error and the run goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tinkerkube_contract.pod_api import ErrorCategory, ErrorCode, OpState, RunState
from tinkerkube_gateway import scheduling
from tinkerkube_gateway.backends.attach import INFO_WAIT_SECONDS
from tinkerkube_gateway.backends.base import SessionBackend, TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, PodClient, TrainerUnreachable
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)
CREATED = OpResult(OpState.COMPLETE, "application/json", b"{}")


class ResultSink(Protocol):
    """Where a worker reports (services/results.py)."""

    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None: ...
    async def on_dead(self, model_id: str, reason: str) -> None: ...
    async def on_result(self, fut: FutureRecord, result: OpResult) -> None: ...
    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None: ...
    async def seal_gap(self, model_id: str, seq_id: int, reason: str) -> FutureRecord | None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerDeps:
    """What every worker of a dispatcher shares; a worker never reaches back into its dispatcher."""

    repo: AsyncRepo
    backend: SessionBackend
    pods: PodClient
    sink: ResultSink
    start_timeout: float
    gap_timeout: float
    max_gap: int  # a longer hole is not sealed seq_id by seq_id: the ops behind it just fail
    replica_id: str  # whose lease a worker launched with an epoch dispatches under
    spawn: Callable[[Awaitable[None]], None]  # run a coroutine as a task the dispatcher tracks
    lost: Callable[[str], Awaitable[None]]  # (model_id): another replica took the run over


class ModelWorker:
    def __init__(self, model_id: str, deps: WorkerDeps, next_seq: int = 1, trainer_next: int = 1, *,
                 epoch: int | None = None):
        self.model_id = model_id
        self.epoch = epoch  # the lease epoch: an op gets a trainer seq only while this replica holds it
        self.deps = deps
        self.next_seq = next_seq
        self.trainer_next = trainer_next
        self.waiting: dict[int, FutureRecord] = {}
        self.inflight: collections.deque[FutureRecord] = collections.deque()
        self.handle: TrainerHandle | None = None
        self.boot_id: str | None = None
        self.ready = asyncio.Event()
        self.dead: str | None = None
        self._wake = asyncio.Event()
        self._poll_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.first: list[FutureRecord] = []  # create futures, completed when the trainer is ready
        self._refilling = asyncio.Lock()
        self._overdue: tuple[int, float] | None = None  # (next_seq, when the ops behind it give up on it)

    def start(self, first: list[FutureRecord], resend: list[FutureRecord]) -> None:
        self.first = list(first)
        self._tasks.append(asyncio.create_task(self._run(first, resend), name=f"worker:{self.model_id}"))

    def enqueue(self, fut: FutureRecord) -> None:
        """A pending op to forward, or a failed one (refused at submit) whose seq_id is to be skipped."""
        if self.dead is not None and fut.state == FutureState.PENDING:
            self.deps.spawn(self._fail(fut, self.dead, ErrorCategory.SERVER))
            return
        if fut.seq_id is None or fut.seq_id < self.next_seq:
            return
        self.waiting[fut.seq_id] = fut
        self._wake.set()

    async def refill(self) -> None:
        """Read ops persisted by any replica (from `next_seq` on) into the queue; idempotent."""
        async with self._refilling:
            rows = await self.deps.repo.futures_for_target(self.model_id, after_seq=self.next_seq - 1)
        for fut in rows:
            if fut.seq_id is not None and fut.seq_id not in self.waiting:
                self.enqueue(fut)

    async def _assign(self, fut: FutureRecord, trainer_seq: int | None) -> bool:
        """Records the op's trainer seq (the op log); False when this replica lost the run's lease."""
        if self.epoch is None:
            await self.deps.repo.set_trainer_seq(fut.request_id, trainer_seq)
            return True
        return bool(await self.deps.repo.assign_trainer_seq(fut.request_id, trainer_seq, model_id=self.model_id,
                                                            owner=self.deps.replica_id, epoch=self.epoch))

    async def get_handle(self, timeout: float) -> TrainerHandle:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.dead is not None or self.handle is None:
            raise TrainerUnreachable(self.dead or f"trainer for {self.model_id} is not running")
        return self.handle

    async def _run(self, first: list[FutureRecord], resend: list[FutureRecord]) -> None:
        try:
            await self._start(first, resend)
        except Exception as exc:  # the store or the sink failed us: nothing of this run may hang on it
            log.exception("dispatching %s failed", self.model_id)
            await self._die(f"the gateway could not dispatch {self.model_id} ({type(exc).__name__}: {exc}); "
                            "retry from your last checkpoint", [])

    async def _start(self, first: list[FutureRecord], resend: list[FutureRecord]) -> None:
        try:
            self.handle = await self.deps.backend.wait_ready(self.model_id, self.deps.start_timeout)
            info = await self.deps.pods.info(self.handle, self.model_id)
        except (TrainerStartFailed, TimeoutError, TrainerUnreachable, OpRejected) as exc:
            await self._die(f"trainer for {self.model_id} failed to start: {getattr(exc, 'message', exc)}", first)
            return
        self.boot_id = info.boot_id
        await self.deps.sink.on_ready(self.model_id, self.handle)
        self.ready.set()
        for fut in first:
            await self.deps.sink.on_result(fut, CREATED)
        self.first = []
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"poller:{self.model_id}"))
        behind = (info.last_completed_seq_id or 0) < self.trainer_next - 1
        if behind:  # restored from a checkpoint while no gateway watched (its pool died): replay the tail
            self.inflight.extend(resend)
            if not await self._resubmit(self.handle, info.last_completed_seq_id, self.trainer_next - 1,
                                        "its trainer was restored while the gateway was down"):
                return
        else:
            for fut in resend:  # forwarded before a gateway restart: same trainer_seq, idempotent PUT
                if await self._forward(fut) is False:
                    return
                self.inflight.append(fut)
        self._poll_wake.set()
        await self._forward_loop()

    async def _forward_loop(self) -> None:
        while self.dead is None:
            for seq in scheduling.forwardable(self.next_seq, self.waiting):
                fut = self.waiting.pop(seq)
                self.next_seq = seq + 1
                if fut.state != FutureState.PENDING:
                    continue  # refused at submit, or a sealed gap: takes no trainer seq
                try:
                    if not await self._forward_next(fut):
                        return
                except Exception as exc:
                    log.exception("forwarding seq %s of %s failed", seq, self.model_id)
                    with contextlib.suppress(Exception):
                        await self._assign(fut, None)  # it holds no trainer seq: the next op takes it
                    await self._fail(fut, f"the gateway could not forward this {fut.op} ({type(exc).__name__}: "
                                     f"{exc}); it did not run", ErrorCategory.SERVER)
            await self._wait_for_ops()

    async def _forward_next(self, fut: FutureRecord) -> bool:
        """Forwards the next op under the next trainer seq; False when this worker is to stop."""
        fut = dataclasses.replace(fut, trainer_seq=self.trainer_next)
        if not await self._assign(fut, fut.trainer_seq):
            log.warning("lost the lease of %s before forwarding seq %s; another replica goes on",
                        self.model_id, fut.seq_id)
            self.deps.spawn(self.deps.lost(self.model_id))
            return False
        sent = await self._forward(fut)
        if sent is False:
            return False
        if self.dead is not None:  # the trainer died while this op was being forwarded
            await self._fail(fut, self.dead, ErrorCategory.SERVER)
            return False
        if sent:
            self.trainer_next += 1
            self.inflight.append(fut)
            self._poll_wake.set()
        return True

    async def _wait_for_ops(self) -> None:
        """Until an op is submitted, or the ops waiting behind a missing seq_id have waited `gap_timeout`."""
        waiting = [seq for seq, fut in self.waiting.items() if fut.state == FutureState.PENDING]
        now = asyncio.get_running_loop().time()
        if not waiting:
            self._overdue = None
            await self._wake.wait()
        else:
            if self._overdue is None or self._overdue[0] != self.next_seq:
                self._overdue = (self.next_seq, now + self.deps.gap_timeout)
            if self._overdue[1] <= now:
                try:
                    await self._seal_gap(waiting)
                except Exception:  # the store failed us: try again after another timeout
                    log.exception("sealing the gap of %s at seq %s failed", self.model_id, self.next_seq)
                    self._overdue = (self.next_seq, now + self.deps.gap_timeout)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._overdue[1] - now):
                    await self._wake.wait()
        self._wake.clear()

    async def _seal_gap(self, waiting: list[int]) -> None:
        hole = scheduling.gap(self.next_seq, self.waiting)
        named = ", ".join(map(str, hole[:5])) + (f" ... {hole[-1]}" if len(hole) > 5 else "")
        reason = (f"seq_id {named} of {self.model_id} never arrived within {self.deps.gap_timeout:g}s "
                  "(the gateway seals such a gap so that later ops go on)")
        log.warning("sealing %s", reason)
        if len(hole) <= self.deps.max_gap:
            for seq in hole:
                sealed = await self.deps.sink.seal_gap(self.model_id, seq, reason)
                if sealed is None:  # it arrived after all (another replica stored it): read it in
                    await self.refill()
                    return
                self.waiting[seq] = sealed
        for seq in sorted(waiting):
            fut = self.waiting[seq]
            self.waiting[seq] = dataclasses.replace(fut, state=FutureState.FAILED)
            await self._fail(fut, f"{reason}; this {fut.op} (seq_id {seq}) waited behind it and did not run",
                             ErrorCategory.USER)

    async def _forward(self, fut: FutureRecord) -> bool | None:
        """True: forwarded; None: rejected by the trainer (future failed); False: the trainer is gone.
        A trainer restart handled while this op was on its way (the replay covers only ops already
        counted) may have lost it with the old trainer: it is then sent again, to the new one."""
        assert fut.trainer_seq is not None
        while True:
            assert self.handle is not None
            boot = self.boot_id
            try:
                await self.deps.pods.submit_op(self.handle, self.model_id, fut.trainer_seq, fut.op,
                                               fut.body or b"", fut.body_type or "application/json")
                if self.boot_id != boot:
                    continue
                return True
            except OpRejected as exc:
                await self._assign(fut, None)
                await self._fail(fut, exc.detail, exc.category)
                return None
            except TrainerUnreachable as exc:
                if not await self._recover(str(exc), upto=fut.trainer_seq - 1):
                    await self._fail(fut, self.dead or str(exc), ErrorCategory.SERVER)
                    return False

    async def _poll_loop(self) -> None:
        while self.dead is None:
            if not self.inflight:
                await self._poll_wake.wait()
                self._poll_wake.clear()
                continue
            fut = self.inflight[0]
            try:
                await self._poll(fut)
            except Exception as exc:
                log.exception("reading the result of seq %s of %s failed", fut.seq_id, self.model_id)
                with contextlib.suppress(ValueError):
                    self.inflight.remove(fut)
                await self._fail(fut, f"the gateway could not read the result of this {fut.op} "
                                 f"({type(exc).__name__}: {exc}); it may have run", ErrorCategory.SERVER)

    async def _poll(self, fut: FutureRecord) -> None:
        """One long-poll of the oldest op in flight; its result goes to the sink once it has one."""
        assert self.handle is not None and fut.trainer_seq is not None
        boot = self.boot_id
        try:
            result = await self.deps.pods.poll_op(self.handle, self.model_id, fut.trainer_seq)
        except (TrainerUnreachable, OpRejected) as exc:
            if not await self._recover(str(exc), upto=self.trainer_next - 1):
                return
            forgotten = isinstance(exc, OpRejected) and exc.code == ErrorCode.UNKNOWN_OP and self.boot_id == boot
            if forgotten and self.inflight and self.inflight[0] is fut:  # else it would be polled forever
                self.inflight.popleft()
                await self._fail(fut, f"the trainer for {self.model_id} no longer has the result of this {fut.op} "
                                 "(it expired); it ran. Go on from here, or retry from a checkpoint",
                                 ErrorCategory.SERVER)
            return
        if result.state is OpState.PENDING:
            return
        self.inflight.popleft()
        await self.deps.sink.on_result(fut, result)

    async def _recover(self, problem: str, *, upto: int) -> bool:
        """True when the worker can go on (a transient error, or replayed after a trainer restart)."""
        loop = asyncio.get_running_loop()
        attach_deadline = loop.time() + self.deps.start_timeout
        tries = 0
        while tries < 5:
            handle = await self.deps.backend.handle(self.model_id)
            if handle is None:
                break
            try:
                info = await self.deps.pods.info(handle, self.model_id, wait=INFO_WAIT_SECONDS)
            except (TrainerUnreachable, OpRejected):
                tries += 1
                await asyncio.sleep(1.0)
                continue
            if info.state is RunState.ATTACHING and loop.time() < attach_deadline:
                continue  # attached again to a restarted pool and still restoring: its restore point comes with it
            if info.boot_id == self.boot_id:
                await asyncio.sleep(0.5)
                return True
            return await self._replay(handle, info.boot_id, info.last_completed_seq_id, upto)
        reason = getattr(self.deps.backend, "exit_reason", lambda _m: problem)(self.model_id)
        await self._die(f"the trainer for {self.model_id} is gone ({reason}); create a new training client "
                        "from your last checkpoint and retry", [])
        return False

    async def _replay(self, handle: TrainerHandle, boot_id: str, restored: int | None, upto: int) -> bool:
        self.handle, self.boot_id = handle, boot_id
        await self._fail_unfetched(restored or 0)
        return await self._resubmit(handle, restored, upto, f"its trainer restarted (boot {boot_id})")

    async def _resubmit(self, handle: TrainerHandle, restored: int | None, upto: int, why: str) -> bool:
        """Re-send, in order, every op after the trainer's restore point up to `upto` from the op log
        (idempotent for ops the trainer still holds); False when that is impossible (the run dies)."""
        rows = await self.deps.repo.futures_after_trainer_seq(self.model_id, restored or 0)
        logged = {f.trainer_seq: f.body is not None for f in rows if f.trainer_seq is not None}
        plan = scheduling.replay_plan(restored, logged, upto)
        if not plan.possible:
            await self._die(f"the trainer for {self.model_id} restarted and its lost ops cannot be replayed "
                            f"({plan.reason}); retry from your last checkpoint", [])
            return False
        log.warning("%s: %s; replaying trainer seq %s", self.model_id, why, plan.seq_ids)
        by_seq = {f.trainer_seq: f for f in rows}
        for seq in plan.seq_ids:
            fut = by_seq[seq]
            try:
                await self.deps.pods.submit_op(handle, self.model_id, seq, fut.op, fut.body or b"",
                                               fut.body_type or "application/json")
            except (TrainerUnreachable, OpRejected) as exc:
                await self._die(f"replay to the restarted trainer {self.model_id} failed: {exc}; retry", [])
                return False
        return True

    async def _fail_unfetched(self, restored: int) -> None:
        """Ops the old trainer finished (their effect is in the restored state) but whose results were not
        read before it went: the results died with it. Re-running them would apply them twice."""
        lost = [f for f in self.inflight if f.trainer_seq is not None and f.trainer_seq <= restored]
        for fut in lost:
            self.inflight.remove(fut)
            await self._fail(
                fut, f"the trainer for {self.model_id} restarted after running this {fut.op} (its effect is kept) "
                "but before its result was read; the result is lost. Go on from here, or retry from a checkpoint",
                ErrorCategory.SERVER)

    async def _fail(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None:
        """Fails one future; an error doing so is logged, never raised into a loop (its waiter re-reads the
        store on its next long-poll)."""
        try:
            await self.deps.sink.on_failure(fut, error, category)
        except Exception:
            log.exception("could not record the failure of %s (%s)", fut.request_id, error)

    async def _die(self, reason: str, extra: list[FutureRecord]) -> None:
        self.dead = reason
        self.ready.set()
        doomed = [*extra, *self.pending()]
        self.first = []
        self.inflight.clear()
        self.waiting.clear()
        self._wake.set()
        self._poll_wake.set()
        for fut in doomed:
            await self._fail(fut, reason, ErrorCategory.SERVER)
        try:
            await self.deps.sink.on_dead(self.model_id, reason)
        except Exception:
            log.exception("could not record that %s died", self.model_id)

    def pending(self) -> list[FutureRecord]:
        return [*self.first, *self.inflight, *(f for f in self.waiting.values() if f.state == FutureState.PENDING)]

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
