"""ModelWorker: one trainer process group's ordered op stream.

It waits for the trainer's readiness (then completes the create future), forwards the contiguous run
of ops starting at the next expected SDK seq_id (`scheduling.forwardable`), and a poller long-polls
results in the same order. Woken by an Event on submit: no sleeping loop.

Two numberings: the SDK's `seq_id` orders ops; the trainer's `trainer_seq` is assigned at forwarding,
contiguously, and persisted first (the op log). An op the gateway or trainer rejects takes no trainer
seq, so the trainer's own ordered queue never waits on a gap.

Crash recovery: when the trainer stops answering, the backend says whether it is gone (fail every
pending future clearly) or was recreated (a new `boot_id`): then the ops after the trainer's restore
point are replayed from the op log (`scheduling.replay_plan`), or failed with a retryable error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from tinkerkube_contract.pod_api import ErrorCategory, OpState
from tinkerkube_gateway import scheduling
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, TrainerUnreachable
from tinkerkube_gateway.store.records import FutureRecord, FutureState

if TYPE_CHECKING:
    from tinkerkube_gateway.dispatcher import Dispatcher

log = logging.getLogger(__name__)
CREATED = OpResult(OpState.COMPLETE, "application/json", b"{}")


class ModelWorker:
    def __init__(self, model_id: str, dispatcher: Dispatcher, next_seq: int = 1, trainer_next: int = 1, *,
                 epoch: int | None = None):
        self.model_id = model_id
        self.epoch = epoch  # the lease epoch: an op gets a trainer seq only while this replica holds it
        self.d = dispatcher
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

    def start(self, first: list[FutureRecord], resend: list[FutureRecord]) -> None:
        self.first = list(first)
        self._tasks.append(asyncio.create_task(self._run(first, resend), name=f"worker:{self.model_id}"))

    def enqueue(self, fut: FutureRecord) -> None:
        """A pending op to forward, or a failed one (rejected at submit) whose seq_id is to be skipped."""
        if self.dead is not None and fut.state == FutureState.PENDING:
            self.d.spawn(self.d.sink.on_failure(fut, self.dead, ErrorCategory.SERVER))
            return
        if fut.seq_id is None or fut.seq_id < self.next_seq:
            return
        self.waiting[fut.seq_id] = fut
        self._wake.set()

    async def refill(self) -> None:
        """Read ops persisted by any replica (from `next_seq` on) into the queue; idempotent."""
        async with self._refilling:
            rows = await self.d.repo.futures_for_target(self.model_id, after_seq=self.next_seq - 1)
        for fut in rows:
            if fut.state == FutureState.PENDING and (fut.meta or {}).get("rejected"):
                continue  # being failed at submit (skip): its notification follows
            if fut.seq_id is not None and fut.seq_id not in self.waiting:
                self.enqueue(fut)

    async def _assign(self, fut: FutureRecord, trainer_seq: int | None) -> bool:
        """Records the op's trainer seq (the op log); False when this replica lost the run's lease."""
        if self.epoch is None:
            await self.d.repo.set_trainer_seq(fut.request_id, trainer_seq)
            return True
        return bool(await self.d.repo.assign_trainer_seq(fut.request_id, trainer_seq, model_id=self.model_id,
                                                         owner=self.d.replica_id, epoch=self.epoch))

    async def get_handle(self, timeout: float) -> TrainerHandle:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.dead is not None or self.handle is None:
            raise TrainerUnreachable(self.dead or f"trainer for {self.model_id} is not running")
        return self.handle

    async def _run(self, first: list[FutureRecord], resend: list[FutureRecord]) -> None:
        try:
            self.handle = await self.d.backend.wait_ready(self.model_id, self.d.start_timeout)
            self.boot_id = (await self.d.pods.info(self.handle, self.model_id)).boot_id
        except (TrainerStartFailed, TimeoutError, TrainerUnreachable, OpRejected) as exc:
            await self._die(f"trainer for {self.model_id} failed to start: {getattr(exc, 'message', exc)}", first)
            return
        await self.d.sink.on_ready(self.model_id, self.handle)
        self.ready.set()
        for fut in first:
            await self.d.sink.on_result(fut, CREATED)
        self.first = []
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"poller:{self.model_id}"))
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
                    continue  # rejected at submit: takes no trainer seq
                fut = dataclasses.replace(fut, trainer_seq=self.trainer_next)
                if not await self._assign(fut, fut.trainer_seq):
                    log.warning("lost the lease of %s before forwarding seq %s; another replica goes on",
                                self.model_id, seq)
                    self.d.spawn(self.d.drop(self.model_id))
                    return
                sent = await self._forward(fut)
                if sent is False:
                    return
                if self.dead is not None:  # the trainer died while this op was being forwarded
                    await self.d.sink.on_failure(fut, self.dead, ErrorCategory.SERVER)
                    return
                if sent:
                    self.trainer_next += 1
                    self.inflight.append(fut)
                    self._poll_wake.set()
            await self._wake.wait()
            self._wake.clear()

    async def _forward(self, fut: FutureRecord) -> bool | None:
        """True: forwarded; None: rejected by the trainer (future failed); False: the trainer is gone.
        A trainer restart handled while this op was on its way (the replay covers only ops already
        counted) may have lost it with the old trainer: it is then sent again, to the new one."""
        assert fut.trainer_seq is not None
        while True:
            assert self.handle is not None
            boot = self.boot_id
            try:
                await self.d.pods.submit_op(self.handle, self.model_id, fut.trainer_seq, fut.op, fut.body or b"",
                                            fut.body_type or "application/json")
                if self.boot_id != boot:
                    continue
                return True
            except OpRejected as exc:
                await self._assign(fut, None)
                await self.d.sink.on_failure(fut, exc.detail, exc.category)
                return None
            except TrainerUnreachable as exc:
                if not await self._recover(str(exc), upto=fut.trainer_seq - 1):
                    await self.d.sink.on_failure(fut, self.dead or str(exc), ErrorCategory.SERVER)
                    return False

    async def _poll_loop(self) -> None:
        while self.dead is None:
            if not self.inflight:
                await self._poll_wake.wait()
                self._poll_wake.clear()
                continue
            fut = self.inflight[0]
            assert self.handle is not None and fut.trainer_seq is not None
            try:
                result = await self.d.pods.poll_op(self.handle, self.model_id, fut.trainer_seq)
            except (TrainerUnreachable, OpRejected) as exc:
                if not await self._recover(str(exc), upto=self.trainer_next - 1):
                    return
                continue
            if result.state is OpState.PENDING:
                continue
            self.inflight.popleft()
            await self.d.sink.on_result(fut, result)

    async def _recover(self, problem: str, *, upto: int) -> bool:
        """True when the worker can go on (a transient error, or replayed after a trainer restart)."""
        for _ in range(5):
            handle = await self.d.backend.handle(self.model_id)
            if handle is None:
                break
            try:
                info = await self.d.pods.info(handle, self.model_id)
            except (TrainerUnreachable, OpRejected):
                await asyncio.sleep(1.0)
                continue
            if info.boot_id == self.boot_id:
                await asyncio.sleep(0.5)
                return True
            return await self._replay(handle, info.boot_id, info.last_completed_seq_id, upto)
        reason = getattr(self.d.backend, "exit_reason", lambda _m: problem)(self.model_id)
        await self._die(f"the trainer for {self.model_id} is gone ({reason}); create a new training client "
                        "from your last checkpoint and retry", [])
        return False

    async def _replay(self, handle: TrainerHandle, boot_id: str, restored: int | None, upto: int) -> bool:
        rows = await self.d.repo.futures_after_trainer_seq(self.model_id, restored or 0)
        logged = {f.trainer_seq: f.body is not None for f in rows if f.trainer_seq is not None}
        plan = scheduling.replay_plan(restored, logged, upto)
        if not plan.possible:
            await self._die(f"the trainer for {self.model_id} restarted and its lost ops cannot be replayed "
                            f"({plan.reason}); retry from your last checkpoint", [])
            return False
        log.warning("trainer %s restarted (boot %s); replaying %s", self.model_id, boot_id, plan.seq_ids)
        self.handle, self.boot_id = handle, boot_id
        await self._fail_unfetched(restored or 0)
        by_seq = {f.trainer_seq: f for f in rows}
        for seq in plan.seq_ids:
            fut = by_seq[seq]
            try:
                await self.d.pods.submit_op(handle, self.model_id, seq, fut.op, fut.body or b"",
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
            await self.d.sink.on_failure(
                fut, f"the trainer for {self.model_id} restarted after running this {fut.op} (its effect is kept) "
                "but before its result was read; the result is lost. Go on from here, or retry from a checkpoint",
                ErrorCategory.SERVER)

    async def _die(self, reason: str, extra: list[FutureRecord]) -> None:
        self.dead = reason
        self.ready.set()
        doomed = [*extra, *self.pending()]
        self.first = []
        self.inflight.clear()
        self.waiting.clear()
        for fut in doomed:
            await self.d.sink.on_failure(fut, reason, ErrorCategory.SERVER)
        await self.d.sink.on_dead(self.model_id, reason)

    def pending(self) -> list[FutureRecord]:
        return [*self.first, *self.inflight, *(f for f in self.waiting.values() if f.state == FutureState.PENDING)]

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
