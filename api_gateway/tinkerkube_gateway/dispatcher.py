"""Forwards each model's ops to its trainer strictly in seq_id order and completes their futures.

One `ModelWorker` per trainer process group (training run or started sampler). It waits for the
trainer's readiness (completing the create_model / create-via-load future), then forwards the
contiguous run of ops starting at the next expected seq_id (`scheduling.forwardable`), and a poller
long-polls results in the same order. Woken by an Event on submit: no sleeping loop.

Crash recovery: when the trainer stops answering, the backend says whether it is gone (fail every
pending future clearly) or was recreated (a new `boot_id`): then the ops after the trainer's restore
point are replayed from the op log (`scheduling.replay_plan`), or failed with a retryable error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tinkerkube_contract.pod_api import CONTENT_PROTOBUF, ErrorCategory, OpKind, OpState, SampleOp
from tinkerkube_gateway import scheduling
from tinkerkube_gateway.backends.base import SessionBackend, TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, PodClient, TrainerUnreachable
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None: ...
    async def on_dead(self, model_id: str, reason: str) -> None: ...
    async def on_result(self, fut: FutureRecord, result: OpResult) -> None: ...
    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None: ...


class ModelWorker:
    def __init__(self, model_id: str, dispatcher: Dispatcher, next_seq: int = 1):
        self.model_id = model_id
        self.d = dispatcher
        self.next_seq = next_seq
        self.waiting: dict[int, FutureRecord] = {}
        self.inflight: collections.deque[FutureRecord] = collections.deque()
        self.handle: TrainerHandle | None = None
        self.boot_id: str | None = None
        self.ready = asyncio.Event()
        self.dead: str | None = None
        self._wake = asyncio.Event()
        self._poll_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, first_futures: list[FutureRecord]) -> None:
        self._tasks.append(asyncio.create_task(self._run(first_futures), name=f"worker:{self.model_id}"))

    def enqueue(self, fut: FutureRecord) -> None:
        if self.dead is not None:
            self.d.spawn(self.d.sink.on_failure(fut, self.dead, ErrorCategory.SERVER))
            return
        if fut.seq_id is None or fut.seq_id < self.next_seq:
            return  # already forwarded (a retried submit of a known op)
        self.waiting[fut.seq_id] = fut
        self._wake.set()

    async def get_handle(self, timeout: float) -> TrainerHandle:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.dead is not None or self.handle is None:
            raise TrainerUnreachable(self.dead or f"trainer for {self.model_id} is not running")
        return self.handle

    async def _run(self, first_futures: list[FutureRecord]) -> None:
        try:
            self.handle = await self.d.backend.wait_ready(self.model_id, self.d.start_timeout)
            self.boot_id = (await self.d.pods.info(self.handle)).boot_id
        except (TrainerStartFailed, TimeoutError, TrainerUnreachable, OpRejected) as exc:
            await self._die(f"trainer for {self.model_id} failed to start: {getattr(exc, 'message', exc)}",
                            first_futures)
            return
        await self.d.sink.on_ready(self.model_id, self.handle)
        self.ready.set()
        for fut in first_futures:
            await self.d.sink.on_result(fut, OpResult(OpState.COMPLETE, "application/json", b"{}"))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"poller:{self.model_id}"))
        while self.dead is None:
            for seq in scheduling.forwardable(self.next_seq, self.waiting):
                fut = self.waiting.pop(seq)
                sent = await self._forward(fut)
                if sent is False:
                    return
                if sent:
                    self.inflight.append(fut)
                self.next_seq = seq + 1
                self._poll_wake.set()
            await self._wake.wait()
            self._wake.clear()

    async def _forward(self, fut: FutureRecord) -> bool | None:
        """True: forwarded; None: rejected by the trainer (future failed); False: the trainer is gone."""
        assert fut.seq_id is not None
        while True:
            assert self.handle is not None
            try:
                await self.d.pods.submit_op(self.handle, self.model_id, fut.seq_id, fut.op, fut.body or b"",
                                            fut.body_type or "application/json")
                return True
            except OpRejected as exc:
                await self.d.sink.on_failure(fut, exc.detail, exc.category)
                return None
            except TrainerUnreachable as exc:
                self.next_seq = fut.seq_id  # not forwarded yet: a replay stops before it
                self.waiting[fut.seq_id] = fut
                if not await self._recover(str(exc)):
                    return False
                self.waiting.pop(fut.seq_id, None)

    async def _poll_loop(self) -> None:
        while self.dead is None:
            if not self.inflight:
                await self._poll_wake.wait()
                self._poll_wake.clear()
                continue
            fut = self.inflight[0]
            assert self.handle is not None and fut.seq_id is not None
            try:
                result = await self.d.pods.poll_op(self.handle, self.model_id, fut.seq_id)
            except (TrainerUnreachable, OpRejected) as exc:
                if not await self._recover(str(exc)):
                    return
                continue
            if result.state is OpState.PENDING:
                continue
            self.inflight.popleft()
            await self.d.sink.on_result(fut, result)

    async def _recover(self, problem: str) -> bool:
        """True when the worker can go on (transient, or replayed after a restart)."""
        for _ in range(3):
            handle = await self.d.backend.handle(self.model_id)
            if handle is None:
                break
            try:
                info = await self.d.pods.info(handle)
            except (TrainerUnreachable, OpRejected):
                await asyncio.sleep(1.0)
                continue
            if info.boot_id == self.boot_id:
                await asyncio.sleep(0.5)
                return True
            return await self._replay(handle, info.boot_id, info.last_completed_seq_id)
        reason = getattr(self.d.backend, "exit_reason", lambda m: problem)(self.model_id)
        await self._die(f"the trainer for {self.model_id} is gone ({reason}); create a new training client "
                        "from your last checkpoint and retry", [])
        return False

    async def _replay(self, handle: TrainerHandle, boot_id: str, restored: int | None) -> bool:
        log_rows = await self.d.repo.futures_for_target(self.model_id, after_seq=restored or 0)
        logged = {f.seq_id: f.body is not None for f in log_rows if f.seq_id is not None}
        plan = scheduling.replay_plan(restored, logged, self.next_seq - 1)
        if not plan.possible:
            await self._die(f"the trainer for {self.model_id} restarted and its lost ops cannot be replayed "
                            f"({plan.reason}); retry from your last checkpoint", [])
            return False
        log.warning("trainer %s restarted (boot %s); replaying seq %s", self.model_id, boot_id, plan.seq_ids)
        self.handle, self.boot_id = handle, boot_id
        by_seq = {f.seq_id: f for f in log_rows}
        for seq in plan.seq_ids:
            fut = by_seq[seq]
            try:
                await self.d.pods.submit_op(handle, self.model_id, seq, fut.op, fut.body or b"",
                                            fut.body_type or "application/json")
            except (TrainerUnreachable, OpRejected) as exc:
                await self._die(f"replay to the restarted trainer {self.model_id} failed: {exc}; retry", [])
                return False
        return True

    async def _die(self, reason: str, extra: list[FutureRecord]) -> None:
        self.dead = reason
        self.ready.set()
        doomed = [*extra, *self.inflight, *self.waiting.values()]
        self.inflight.clear()
        self.waiting.clear()
        for fut in doomed:
            await self.d.sink.on_failure(fut, reason, ErrorCategory.SERVER)
        await self.d.sink.on_dead(self.model_id, reason)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class Dispatcher:
    def __init__(self, *, repo: AsyncRepo, backend: SessionBackend, pods: PodClient, start_timeout: float):
        self.repo = repo
        self.backend = backend
        self.pods = pods
        self.start_timeout = start_timeout
        self.sink: ResultSink
        self.workers: dict[str, ModelWorker] = {}
        self._samples: set[asyncio.Task[None]] = set()

    def bind(self, sink: ResultSink) -> None:
        self.sink = sink

    def launch(self, model_id: str, first_futures: list[FutureRecord], next_seq: int = 1) -> ModelWorker:
        worker = self.workers.get(model_id)
        if worker is None:
            worker = self.workers[model_id] = ModelWorker(model_id, self, next_seq)
            worker.start(first_futures)
        return worker

    def enqueue(self, fut: FutureRecord) -> None:
        worker = self.workers.get(fut.target_id)
        if worker is None:
            self.spawn(self.sink.on_failure(fut, f"no trainer is running for {fut.target_id}", ErrorCategory.USER))
            return
        worker.enqueue(fut)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._samples.add(task)
        task.add_done_callback(self._samples.discard)

    def submit_sample(self, fut: FutureRecord, backing_model_id: str, op: SampleOp) -> None:
        self.spawn(self._run_sample(fut, backing_model_id, op))

    async def _run_sample(self, fut: FutureRecord, backing_model_id: str, op: SampleOp) -> None:
        worker = self.workers.get(backing_model_id)
        try:
            if worker is None:
                raise TrainerUnreachable(f"the trainer serving {fut.target_id} is not running")
            handle = await worker.get_handle(self.start_timeout)
            await self.pods.submit_sample(handle, fut.request_id, op)
            while True:
                result = await self.pods.poll_sample(handle, fut.request_id)
                if result.state is not OpState.PENDING:
                    break
            await self.sink.on_result(fut, result)
        except OpRejected as exc:
            await self.sink.on_failure(fut, exc.detail, exc.category)
        except (TrainerUnreachable, TimeoutError) as exc:
            await self.sink.on_failure(fut, f"sampling failed: {exc}; retry", ErrorCategory.SERVER)

    async def stop_model(self, model_id: str, reason: str) -> None:
        worker = self.workers.pop(model_id, None)
        if worker is not None:
            await worker.cancel()
            doomed = [*worker.inflight, *worker.waiting.values()]
            for fut in doomed:
                await self.sink.on_failure(fut, reason, ErrorCategory.USER)
        await self.backend.stop(model_id)

    async def close(self) -> None:
        for worker in list(self.workers.values()):
            await worker.cancel()
        for task in list(self._samples):
            task.cancel()
        self.workers.clear()


def is_protobuf(result: OpResult) -> bool:
    return result.content_type.startswith(CONTENT_PROTOBUF)


OpFactory = Callable[[FutureRecord], Awaitable[None]]
__all__ = ["Dispatcher", "FutureState", "ModelWorker", "OpKind", "ResultSink", "is_protobuf"]
