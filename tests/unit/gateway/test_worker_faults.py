"""A run's worker never hangs and never dies of one op: gaps are sealed after the gap timeout, and an
exception while forwarding, reading or recording one op (the store, a Kubernetes API error from a
backend hook, a result the trainer forgot) fails that op alone while the run goes on.

The real store (SQLite), futures and results services; the in-memory trainer of test_worker_recovery.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.unit.gateway.test_worker_recovery import HANDLE, MODEL, FakeBackend, FakeTrainer
from tinkerkube_contract.pod_api import (
    CheckpointWritten,
    ErrorCategory,
    ErrorCode,
    OpState,
    SampleOp,
    SaveResult,
)
from tinkerkube_gateway.backends.base import TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.replicas import Replicas
from tinkerkube_gateway.services.results import MirrorCheckpoint, ResultsService
from tinkerkube_gateway.store.records import FutureOp, FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo, Repo


class Trainer(FakeTrainer):
    """Answers saves with a checkpoint and samples with an empty result; `forgotten` ops answer
    `unknown_op` on the same boot (their results expired)."""

    def __init__(self, forgotten: tuple[int, ...] = ()):
        super().__init__()
        self.forgotten = set(forgotten)

    async def poll_op(self, handle: TrainerHandle, model_id: str, seq: int) -> OpResult:
        if seq in self.forgotten:
            raise OpRejected(404, "no such op (never submitted, or expired)", ErrorCategory.USER,
                             ErrorCode.UNKNOWN_OP)
        result = await super().poll_op(handle, model_id, seq)
        name = json.loads(self.ops[seq]).get("name")
        if name is None:
            return result
        written = CheckpointWritten(tinker_path=f"tinker://{model_id}/weights/{name}", kind="weights", size_bytes=1)
        return OpResult(OpState.COMPLETE, "application/json", SaveResult(checkpoint=written).model_dump_json().encode())

    async def submit_sample(self, handle: TrainerHandle, request_id: str, op: SampleOp) -> None: ...

    async def poll_sample(self, handle: TrainerHandle, request_id: str) -> OpResult:
        return OpResult(OpState.COMPLETE, "application/x-protobuf", b"")


class RaisingResults(ResultsService):
    """A result sink that breaks on the ops in `broken` (as any bug in result handling would)."""

    broken: set[int] = set()

    async def on_result(self, fut: FutureRecord, result: OpResult) -> None:
        if fut.seq_id in self.broken:
            raise RuntimeError("the sink broke")
        await super().on_result(fut, result)


class FailingRepo(AsyncRepo):
    """The store refuses to record a trainer seq for the ops in `broken` (once each)."""

    broken: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if name != "set_trainer_seq":
            return call

        async def set_trainer_seq(request_id: str, trainer_seq: int | None) -> None:
            if trainer_seq is not None and request_id in self.broken:
                self.broken.discard(request_id)
                raise ConnectionError("database connection lost")
            await call(request_id, trainer_seq)

        return set_trainer_seq


@dataclass
class Run:
    repo: AsyncRepo
    futures: FuturesService
    registry: RegistryService
    dispatcher: Dispatcher
    trainer: Trainer

    async def submit(self, seq: int, body: dict[str, object] | None = None, *, enqueue: bool = True) -> FutureRecord:
        fut, _ = await self.futures.create(tenant="t", session_id="s", target_id=MODEL, seq_id=seq,
                                           op=FutureOp.SAVE_STATE if body else FutureOp.OPTIM_STEP,
                                           body=json.dumps(body or {"n": seq}).encode(), body_type="application/json")
        if enqueue:
            self.dispatcher.enqueue(fut)
        return fut

    async def outcome(self, fut: FutureRecord) -> FutureRecord:
        async def finished() -> FutureRecord:
            while (record := await self.futures.wait("t", fut.request_id, timeout=1)).state == FutureState.PENDING:
                pass
            return record

        return await asyncio.wait_for(finished(), 30)


@asynccontextmanager
async def run(tmp_path: Path, trainer: Trainer, *, gap_timeout: float = 300,
              results: type[ResultsService] = ResultsService, mirror: MirrorCheckpoint | None = None,
              repo_type: type[AsyncRepo] = AsyncRepo) -> AsyncIterator[Run]:
    sync = Repo(f"sqlite:///{tmp_path / 'gw.db'}")
    sync.insert_model(model_id=MODEL, session_id="s", tenant="t", kind="train", base_model="b", lora={},
                      user_metadata=None, optimizer_config=None, restore_from=None, weights_key=None,
                      status="ready", error=None, created_at=time.time(), last_request_time=time.time())
    repo = repo_type(sync)
    backend = FakeBackend(trainer)
    futures = FuturesService(repo, Metrics())
    futures.mirror = FuturesMirror(backend, repo)  # type: ignore[arg-type]
    registry = RegistryService(repo, tmp_path / "checkpoints")
    sink = results(repo=repo, futures=futures, registry=registry, replicas=Replicas(repo), backend=backend,  # type: ignore[arg-type]
                   mirror_checkpoint=mirror)
    dispatcher = Dispatcher(repo=repo, backend=backend, pods=trainer, sink=sink, start_timeout=5,  # type: ignore[arg-type]
                            gap_timeout=gap_timeout, max_ahead=10)
    dispatcher.launch(MODEL, [])
    try:
        yield Run(repo, futures, registry, dispatcher, trainer)
    finally:
        await dispatcher.close()
        await futures.mirror.close()
        sync.close()


async def test_ops_behind_a_seq_id_that_never_arrives_fail_and_later_ops_go_on(tmp_path: Path) -> None:
    async with run(tmp_path, Trainer(), gap_timeout=0.3) as r:
        first, third, fourth = await r.submit(1), await r.submit(3), await r.submit(4)  # 2 never comes
        assert (await r.outcome(first)).state == FutureState.COMPLETE
        for behind in (third, fourth):
            failed = await r.outcome(behind)
            assert failed.state == FutureState.FAILED and failed.category == "user"
            assert "seq_id 2 of" in (failed.error or "") and "never arrived" in (failed.error or "")
        sealed = [f for f in await r.repo.futures_for_target(MODEL) if f.seq_id == 2]
        assert [(f.op, f.state) for f in sealed] == [(FutureOp.GAP, FutureState.FAILED)]
        assert (await r.outcome(await r.submit(5))).state == FutureState.COMPLETE
        assert r.trainer.puts == [("boot-1", 1), ("boot-1", 2)]  # ops 1 and 5; nothing that waited ran


async def test_a_gap_another_replica_filled_is_read_in_instead_of_sealed(tmp_path: Path) -> None:
    async with run(tmp_path, Trainer(), gap_timeout=0.3) as r:
        first, third = await r.submit(1), await r.submit(3)
        second = await r.submit(2, enqueue=False)  # stored, its notification lost
        for fut in (first, second, third):
            assert (await r.outcome(fut)).state == FutureState.COMPLETE
        assert [seq for _, seq in r.trainer.puts] == [1, 2, 3]


async def test_a_failing_checkpoint_mirror_fails_that_save_clearly_and_the_run_goes_on(tmp_path: Path) -> None:
    async def mirror(model_id: str, tinker_path: str) -> None:
        raise RuntimeError("Kubernetes API: (500) Internal Server Error")

    async with run(tmp_path, Trainer(), mirror=mirror) as r:
        save, after = await r.submit(1, {"name": "ckpt"}), await r.submit(2)
        failed = await r.outcome(save)
        assert failed.state == FutureState.FAILED and failed.category == "server"
        assert "could not record its result" in (failed.error or "") and "Kubernetes API" in (failed.error or "")
        assert (await r.outcome(after)).state == FutureState.COMPLETE
        assert await r.registry.resolve_readable("t", f"tinker://{MODEL}/weights/ckpt")  # the save itself is kept


async def test_an_exception_while_recording_a_result_fails_that_op_and_the_poller_goes_on(tmp_path: Path) -> None:
    RaisingResults.broken = {2}
    async with run(tmp_path, Trainer(), results=RaisingResults) as r:
        futs = [await r.submit(seq) for seq in (1, 2, 3)]
        outcomes = [await r.outcome(fut) for fut in futs]
        assert [o.state for o in outcomes] == [FutureState.COMPLETE, FutureState.FAILED, FutureState.COMPLETE]
        assert outcomes[1].category == "server" and "the sink broke" in (outcomes[1].error or "")


async def test_a_store_error_while_forwarding_fails_that_op_and_the_next_takes_its_trainer_seq(
        tmp_path: Path) -> None:
    async with run(tmp_path, Trainer(), repo_type=FailingRepo) as r:
        first = await r.submit(1)
        assert (await r.outcome(first)).state == FutureState.COMPLETE
        second = await r.submit(2, enqueue=False)
        FailingRepo.broken = {second.request_id}
        r.dispatcher.enqueue(second)
        third = await r.submit(3)
        failed = await r.outcome(second)
        assert failed.state == FutureState.FAILED and "database connection lost" in (failed.error or "")
        assert (await r.outcome(third)).state == FutureState.COMPLETE
        assert [seq for _, seq in r.trainer.puts] == [1, 2]  # op 3 went as trainer seq 2: no hole there


async def test_a_result_the_trainer_no_longer_has_fails_instead_of_being_polled_forever(tmp_path: Path) -> None:
    async with run(tmp_path, Trainer(forgotten=(2,))) as r:
        futs = [await r.submit(seq) for seq in (1, 2, 3)]
        outcomes = [await r.outcome(fut) for fut in futs]
        assert [o.state for o in outcomes] == [FutureState.COMPLETE, FutureState.FAILED, FutureState.COMPLETE]
        assert "no longer has the result" in (outcomes[1].error or "")


async def test_a_sample_whose_result_cannot_be_recorded_fails_instead_of_staying_pending(tmp_path: Path) -> None:
    RaisingResults.broken = {0}
    async with run(tmp_path, Trainer(), results=RaisingResults) as r:
        fut, _ = await r.futures.create(tenant="t", session_id="s", target_id="s:sample:0", seq_id=0,
                                        op=FutureOp.SAMPLE)
        r.dispatcher.submit_sample(fut, MODEL, SampleOp(request={}))
        failed = await r.outcome(fut)
        assert failed.state == FutureState.FAILED and "sampling failed in the gateway" in (failed.error or "")
        assert HANDLE is await r.dispatcher.backend.handle(MODEL)  # the run itself is untouched
