"""Routes futures to trainers: one `ModelWorker` (worker.py) per trainer process group, which forwards
that model's ops strictly in seq_id order; samples run as independent tasks against the trainer that
serves their sampler. Results and failures go to a `ResultSink` (the ops service)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tinkerkube_contract.pod_api import CONTENT_PROTOBUF, ErrorCategory, OpState, SampleOp
from tinkerkube_gateway.backends.base import SessionBackend, TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, PodClient, TrainerUnreachable
from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.store.repo import AsyncRepo
from tinkerkube_gateway.worker import ModelWorker

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None: ...
    async def on_dead(self, model_id: str, reason: str) -> None: ...
    async def on_result(self, fut: FutureRecord, result: OpResult) -> None: ...
    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None: ...


class Dispatcher:
    def __init__(self, *, repo: AsyncRepo, backend: SessionBackend, pods: PodClient, start_timeout: float):
        self.repo = repo
        self.backend = backend
        self.pods = pods
        self.start_timeout = start_timeout
        self.sink: ResultSink
        self.workers: dict[str, ModelWorker] = {}
        self.replica_id = "local"  # whose lease a worker launched with an epoch dispatches under
        self.on_sample_done: Callable[[str], Awaitable[None]] | None = None  # (request_id)
        self._samples: set[asyncio.Task[None]] = set()

    def bind(self, sink: ResultSink) -> None:
        self.sink = sink

    def launch(self, model_id: str, first: list[FutureRecord], *, next_seq: int = 1, trainer_next: int = 1,
               resend: list[FutureRecord] | None = None, epoch: int | None = None) -> ModelWorker:
        """`epoch`: the run's lease epoch this replica holds (None: no fencing, tests)."""
        worker = self.workers.get(model_id)
        if worker is None:
            worker = self.workers[model_id] = ModelWorker(model_id, self, next_seq, trainer_next, epoch=epoch)
            worker.start(first, resend or [])
        return worker

    def refill(self, model_id: str) -> None:
        """Ops for `model_id` were persisted by another replica: the worker here reads them in."""
        worker = self.workers.get(model_id)
        if worker is not None:
            self.spawn(worker.refill())

    def refill_all(self) -> None:
        for model_id in list(self.workers):
            self.refill(model_id)

    async def drop(self, model_id: str) -> None:
        """Another replica took the run over: stop dispatching it here, failing nothing."""
        worker = self.workers.pop(model_id, None)
        if worker is not None:
            await worker.cancel()

    def enqueue(self, fut: FutureRecord) -> None:
        worker = self.workers.get(fut.target_id)
        if worker is None:
            self.spawn(self.sink.on_failure(fut, f"no trainer is running for {fut.target_id}", ErrorCategory.SERVER))
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
            # another replica may dispatch the run's training ops; samples need no order, only the trainer
            handle = await (worker.get_handle(self.start_timeout) if worker is not None
                            else self.backend.handle(backing_model_id))
            if handle is None:
                raise TrainerUnreachable(f"the trainer serving {fut.target_id} is not running")
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
        if self.on_sample_done is not None:  # not when cancelled (shutdown): its lease expires, another re-runs it
            await self.on_sample_done(fut.request_id)

    async def stop_model(self, model_id: str, reason: str) -> None:
        worker = self.workers.pop(model_id, None)
        if worker is not None:
            await worker.cancel()
            for fut in worker.pending():
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


