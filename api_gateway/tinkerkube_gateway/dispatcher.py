"""Routes futures to trainers: one `ModelWorker` (worker.py) per trainer process group, which forwards
that model's ops strictly in seq_id order; samples run as independent tasks against the trainer that
serves their sampler. Results and failures go to a `ResultSink` (services/results.py).

Dependencies run one way: the dispatcher creates workers and hands them `WorkerDeps`; a worker never
sees its dispatcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from tinkerkube_contract.pod_api import ErrorCategory, OpState, SampleOp
from tinkerkube_gateway.backends.base import SessionBackend, TrainerHandle
from tinkerkube_gateway.bounds import MAX_SEQ_AHEAD, SEQ_GAP_TIMEOUT_SECONDS
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, PodClient, TrainerUnreachable
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo
from tinkerkube_gateway.worker import ModelWorker, ResultSink, WorkerDeps

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, *, repo: AsyncRepo, backend: SessionBackend, pods: PodClient, sink: ResultSink,
                 start_timeout: float, gap_timeout: float = SEQ_GAP_TIMEOUT_SECONDS, max_ahead: int = MAX_SEQ_AHEAD,
                 replica_id: str = "local", on_sample_done: Callable[[str], Awaitable[None]] | None = None):
        """`max_ahead`: how far past a run's next expected seq_id a submit may be; `on_sample_done(request_id)`:
        called when a sample finished here (not when cancelled at shutdown)."""
        self.backend = backend
        self.pods = pods
        self.sink = sink
        self.start_timeout = start_timeout
        self.max_ahead = max_ahead
        self.replica_id = replica_id
        self.on_sample_done = on_sample_done
        self.workers: dict[str, ModelWorker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.deps = WorkerDeps(repo=repo, backend=backend, pods=pods, sink=sink, start_timeout=start_timeout,
                               gap_timeout=gap_timeout, max_gap=max_ahead, replica_id=replica_id, spawn=self.spawn,
                               lost=self.drop)

    def launch(self, model_id: str, first: list[FutureRecord], *, next_seq: int = 1, trainer_next: int = 1,
               resend: list[FutureRecord] | None = None, epoch: int | None = None) -> ModelWorker:
        """`epoch`: the run's lease epoch this replica holds (None: no fencing, tests)."""
        worker = self.workers.get(model_id)
        if worker is None:
            worker = self.workers[model_id] = ModelWorker(model_id, self.deps, next_seq, trainer_next, epoch=epoch)
            worker.start(first, resend or [])
        return worker

    def too_far_ahead(self, model_id: str, seq_id: int) -> int | None:
        """The run's next expected seq_id when `seq_id` is more than `max_ahead` past it (dispatched here)."""
        worker = self.workers.get(model_id)
        if worker is None or seq_id <= worker.next_seq + self.max_ahead:
            return None
        return worker.next_seq

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
            self.spawn(self._fail(fut, f"no trainer is running for {fut.target_id}", ErrorCategory.SERVER))
            return
        worker.enqueue(fut)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def submit_sample(self, fut: FutureRecord, backing_model_id: str, op: SampleOp) -> None:
        self.spawn(self._discard(self.run_sample(fut, backing_model_id, op)))

    @staticmethod
    async def _discard(coro: Awaitable[OpResult | None]) -> None:
        await coro

    def pool_of(self, model_id: str) -> str:
        """What a sample of `model_id` competes for: its trainer pool (several runs share one process group,
        one address) once this replica knows where it runs, else the run itself."""
        worker = self.workers.get(model_id)
        handle = None if worker is None else worker.handle
        return handle.url if handle is not None else f"run:{model_id}"

    def withdraw(self, fut: FutureRecord) -> bool:
        """Takes back a training op that still waits in its worker here (never forwarded): it is replaced
        by a failed copy, so the worker skips its seq_id. False when the op already went to the trainer
        (or another replica dispatches the run): then it runs and its result stands."""
        worker = self.workers.get(fut.target_id)
        waiting = None if worker is None or fut.seq_id is None else worker.waiting.get(fut.seq_id)
        if waiting is None or waiting.state != FutureState.PENDING or waiting.request_id != fut.request_id:
            return False
        worker.enqueue(dataclasses.replace(waiting, state=FutureState.FAILED))  # same seq_id: replaces it
        return True

    async def trainer_handle(self, model_id: str, serving: str | None = None) -> TrainerHandle:
        """The trainer process group of `model_id`, once ready (samples and the text routes go there).
        Another replica may dispatch the run's training ops; samples need no order, only the trainer."""
        worker = self.workers.get(model_id)
        handle = await (worker.get_handle(self.start_timeout) if worker is not None else self.backend.handle(model_id))
        if handle is None:
            raise TrainerUnreachable(f"the trainer serving {serving or model_id} is not running")
        return handle

    async def run_sample(self, fut: FutureRecord, backing_model_id: str, op: SampleOp) -> OpResult | None:
        """Runs one sample to its end and records it; the trainer's answer (None when it failed on the way)."""
        finished = None
        try:
            handle = await self.trainer_handle(backing_model_id, fut.target_id)
            await self.pods.submit_sample(handle, fut.request_id, op)
            while True:
                result = await self.pods.poll_sample(handle, fut.request_id)
                if result.state is not OpState.PENDING:
                    break
            await self.sink.on_result(fut, result)
            finished = result
        except OpRejected as exc:
            await self._fail(fut, exc.detail, exc.category)
        except (TrainerUnreachable, TimeoutError) as exc:
            await self._fail(fut, f"sampling failed: {exc}; retry", ErrorCategory.SERVER)
        except Exception as exc:  # the task ends here: its future must not stay pending
            log.exception("sample %s failed", fut.request_id)
            await self._fail(fut, f"sampling failed in the gateway ({type(exc).__name__}: {exc}); retry",
                             ErrorCategory.SERVER)
        if self.on_sample_done is not None:  # not when cancelled (shutdown): its lease expires, another re-runs it
            await self.on_sample_done(fut.request_id)
        return finished

    async def _fail(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None:
        try:
            await self.sink.on_failure(fut, error, category)
        except Exception:
            log.exception("could not record the failure of %s (%s)", fut.request_id, error)

    async def stop_model(self, model_id: str, reason: str) -> None:
        worker = self.workers.pop(model_id, None)
        if worker is not None:
            await worker.cancel()
            for fut in worker.pending():
                await self._fail(fut, reason, ErrorCategory.USER)
        await self.backend.stop(model_id)

    async def close(self) -> None:
        for worker in list(self.workers.values()):
            await worker.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.workers.clear()
