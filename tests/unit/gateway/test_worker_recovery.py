"""ModelWorker against an in-process fake trainer: in-order forwarding, replay after a trainer restart
(new boot_id) from the op log, and clear failures when replay is impossible or the trainer is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tinkerkube_contract.pod_api import ErrorCategory, OpState, RunInfo, RunState
from tinkerkube_contract.resource import FuturesStatus, LoraSpec, TrainingSessionSpec
from tinkerkube_gateway.backends.base import TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpRejected, OpResult, TrainerUnreachable
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.store.repo import AsyncRepo, Repo

MODEL = "s:train:0"
HANDLE = TrainerHandle("http://trainer", "tok")


class FakeTrainer:
    """Pod API semantics in memory. `restart_on_poll=(seq, restored)` simulates a pod recreation that
    restored the state after `restored` (or an unknown point: None) when `seq` is first polled."""

    def __init__(self, restart_on_poll: tuple[int, int | None] | None = None, gone_on_poll: int | None = None,
                 restart_during_put: tuple[int, int] | None = None, late_results_upto: int = 0):
        self.boot, self.last, self.ops = "boot-1", 0, {}
        self.restart_during_put = restart_during_put  # (seq, restored): the op lands, then the pod restarts
        self.late_results_upto = late_results_upto  # results of these ops are read only after the restart
        self.puts: list[tuple[str, int]] = []
        self.restart_on_poll, self.gone_on_poll, self.alive = restart_on_poll, gone_on_poll, True
        self.attaching_infos = 0  # after a restart, this many info calls find the run still attaching

    async def info(self, handle: TrainerHandle, model_id: str, *, wait: float = 0.0) -> RunInfo:
        if self.attaching_infos > 0 and self.boot != "boot-1":  # the run is being attached again: no restore point yet
            self.attaching_infos -= 1
            return RunInfo(model_id=MODEL, base_model="b", mode="train", lora=LoraSpec(), world_size=1,
                               ready=False, boot_id=self.boot, last_completed_seq_id=None, state=RunState.ATTACHING)
        return RunInfo(model_id=MODEL, base_model="b", mode="train", lora=LoraSpec(), world_size=1, ready=True,
                           boot_id=self.boot, last_completed_seq_id=self.last if self.boot != "lost" else None)

    async def submit_op(self, handle: TrainerHandle, model_id: str, seq: int, kind: str, body: bytes,
                        content_type: str) -> None:
        if not self.alive:
            raise TrainerUnreachable("connection refused")
        self.puts.append((self.boot, seq))
        self.ops[seq] = body
        if self.restart_during_put and self.restart_during_put[0] == seq:
            self.boot, self.ops, self.last = "boot-2", {}, self.restart_during_put[1]
            self.restart_during_put = None
            await asyncio.sleep(0.3)  # the reply is slow: the restart is found and handled meanwhile

    async def poll_op(self, handle: TrainerHandle, model_id: str, seq: int) -> OpResult:
        if self.restart_during_put and seq == self.restart_during_put[0] - 1:
            await asyncio.sleep(0.05)  # the op before is still running when the next one is sent
        if seq <= self.late_results_upto:
            await asyncio.sleep(0.05)
        if self.restart_on_poll and self.restart_on_poll[0] == seq:
            restored = self.restart_on_poll[1]
            self.restart_on_poll = None
            self.boot, self.ops = ("boot-2" if restored is not None else "lost"), {}
            self.last = restored or 0
            raise TrainerUnreachable("connection reset")
        if self.gone_on_poll == seq:
            self.alive = False
            raise TrainerUnreachable("connection refused")
        if seq not in self.ops:
            raise OpRejected(404, "unknown op", ErrorCategory.USER)
        self.last = max(self.last, seq)
        return OpResult(OpState.COMPLETE, "application/json", b'{"metrics": {}}')


class FakeBackend:
    def __init__(self, trainer: FakeTrainer):
        self.trainer = trainer

    async def start(self, spec: TrainingSessionSpec) -> None: ...

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        return HANDLE

    async def handle(self, model_id: str) -> TrainerHandle | None:
        return HANDLE if self.trainer.alive else None

    def exit_reason(self, model_id: str) -> str:
        return "exited with code -9"

    async def stop(self, model_id: str) -> None: ...

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None: ...

    async def close(self) -> None: ...


class Sink:
    def __init__(self) -> None:
        self.results: dict[int, str] = {}
        self.done = asyncio.Event()
        self.expected = 0

    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None: ...

    async def on_dead(self, model_id: str, reason: str) -> None: ...

    async def on_result(self, fut: FutureRecord, result: OpResult) -> None:
        self._record(fut, "complete")

    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None:
        self._record(fut, f"failed: {error}")

    def _record(self, fut: FutureRecord, outcome: str) -> None:
        self.results[fut.seq_id or 0] = outcome
        if len(self.results) >= self.expected:
            self.done.set()


async def _run(tmp_path: Path, trainer: FakeTrainer, seqs: list[int]) -> Sink:
    repo = AsyncRepo(Repo(f"sqlite:///{tmp_path / 'gw.db'}"))
    futures = FuturesService(repo, Metrics())
    sink = Sink()
    sink.expected = len(seqs)
    dispatcher = Dispatcher(repo=repo, backend=FakeBackend(trainer), pods=trainer, sink=sink,  # type: ignore
                            start_timeout=5)
    worker = dispatcher.launch(MODEL, [])
    for seq in seqs:
        fut, _ = await futures.create(tenant="t", session_id="s", target_id=MODEL, seq_id=seq, op="optim_step",
                                      body=f'{{"n": {seq}}}'.encode(), body_type="application/json")
        worker.enqueue(fut)
    await asyncio.wait_for(sink.done.wait(), 10)
    await dispatcher.close()
    repo.close()
    return sink


async def test_ops_arriving_out_of_order_are_forwarded_in_seq_order(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    sink = await _run(tmp_path, trainer, [3, 1, 2])
    assert [seq for _, seq in trainer.puts] == [1, 2, 3]
    assert set(sink.results.values()) == {"complete"}


async def test_a_restarted_trainer_gets_the_lost_ops_replayed_from_the_log(tmp_path: Path) -> None:
    trainer = FakeTrainer(restart_on_poll=(2, 1))  # op 1 was durable, ops 2 and 3 were lost
    sink = await _run(tmp_path, trainer, [1, 2, 3])
    assert trainer.puts[:2] == [("boot-1", 1), ("boot-1", 2)]
    assert {seq for boot, seq in trainer.puts if boot == "boot-2"} == {2, 3}  # replayed (3 may go there first)
    assert set(sink.results.values()) == {"complete"}


async def test_an_op_lost_by_a_restart_during_its_own_submit_is_sent_again(tmp_path: Path) -> None:
    trainer = FakeTrainer(restart_during_put=(3, 1))  # op 3 reaches boot-1, which then restarts from op 1
    sink = await _run(tmp_path, trainer, [1, 2, 3])
    assert ("boot-1", 3) in trainer.puts and ("boot-2", 3) in trainer.puts and ("boot-2", 2) in trainer.puts
    assert set(sink.results.values()) == {"complete"}


async def test_a_result_not_read_before_a_restart_fails_clearly_instead_of_being_polled_forever(
        tmp_path: Path) -> None:
    trainer = FakeTrainer(restart_during_put=(3, 2), late_results_upto=2)  # ops 1-2 ran; restored after 2
    sink = await _run(tmp_path, trainer, [1, 2, 3])
    assert "result is lost" in sink.results[1] and "effect is kept" in sink.results[1]
    assert sink.results[3] == "complete" and ("boot-2", 3) in trainer.puts
    assert ("boot-2", 1) not in trainer.puts  # never applied twice


async def test_replay_without_a_restore_point_fails_pending_futures_retryably(tmp_path: Path) -> None:
    sink = await _run(tmp_path, FakeTrainer(restart_on_poll=(2, None)), [1, 2, 3])
    assert sink.results[1] == "complete"
    assert all("cannot be replayed" in sink.results[s] and "retry" in sink.results[s] for s in (2, 3))


@pytest.mark.parametrize("gone_at", [1, 2])
async def test_a_trainer_that_is_gone_fails_every_pending_future_clearly(tmp_path: Path, gone_at: int) -> None:
    sink = await _run(tmp_path, FakeTrainer(gone_on_poll=gone_at), [1, 2, 3])
    failed = sorted(s for s, outcome in sink.results.items() if outcome.startswith("failed"))
    assert failed == list(range(gone_at, 4))
    assert all("is gone" in sink.results[s] and "exited with code -9" in sink.results[s] for s in failed)


async def test_a_run_still_attaching_to_its_restarted_pool_is_waited_for_then_replayed(tmp_path: Path) -> None:
    trainer = FakeTrainer(restart_on_poll=(3, 2))
    trainer.attaching_infos = 3  # its restore point is unknown until the attach finishes
    sink = await _run(tmp_path, trainer, [1, 2, 3, 4])
    assert set(sink.results.values()) == {"complete"}, sink.results
    assert trainer.attaching_infos == 0 and ("boot-2", 3) in trainer.puts  # waited, then replayed what was lost
