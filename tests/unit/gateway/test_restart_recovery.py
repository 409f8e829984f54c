"""Gateway restart with trainers still running (the Kubernetes case): pending futures are re-dispatched,
ops already forwarded are re-sent under the same trainer seq (idempotent), later ones continue in order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.unit.gateway.test_worker_recovery import MODEL, FakeBackend, FakeTrainer
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo, Repo


class CompletingSink:
    def __init__(self, futures: FuturesService):
        self.futures = futures

    async def on_ready(self, *_: object) -> None: ...

    async def on_dead(self, *_: object) -> None: ...

    async def on_result(self, fut, result) -> None:  # type: ignore[no-untyped-def]
        await self.futures.complete(fut, result.body, result.content_type)

    async def on_failure(self, fut, error, category) -> None:  # type: ignore[no-untyped-def]
        await self.futures.fail(fut, error, category)


def _store_with_a_ready_run(tmp_path: Path) -> tuple[Repo, AsyncRepo, FuturesService]:
    """The store a previous gateway left behind: one ready training run, MODEL."""
    sync = Repo(f"sqlite:///{tmp_path / 'gw.db'}")
    now = time.time()
    sync.insert_model(model_id=MODEL, session_id="s", tenant="t", kind="train", base_model="b", lora={},
                      user_metadata=None, optimizer_config=None, restore_from=None, weights_key=None,
                      status="ready", error=None, created_at=now, last_request_time=now)
    repo = AsyncRepo(sync)
    return sync, repo, FuturesService(repo, Metrics())


async def _submit(futures: FuturesService, seq: int) -> FutureRecord:
    fut, _ = await futures.create(tenant="t", session_id="s", target_id=MODEL, seq_id=seq, op="optim_step",
                                  body=f'{{"n": {seq}}}'.encode(), body_type="application/json")
    return fut


async def _restart_gateway(repo: AsyncRepo, futures: FuturesService, trainer: FakeTrainer,
                           tmp_path: Path) -> Dispatcher:
    """A new gateway process on that store, its trainer still running: `ModelsService.recover()`."""
    backend = FakeBackend(trainer)
    dispatcher = Dispatcher(repo=repo, backend=backend, pods=trainer, sink=CompletingSink(futures),  # type: ignore
                            start_timeout=5)
    sessions = SessionsService(repo, Metrics(), idle_timeout=60, reap_interval=60)
    models = ModelsService(repo=repo, futures=futures, sessions=sessions, dispatcher=dispatcher,
                           backend=backend,  # type: ignore[arg-type]
                           model_cache_dir=tmp_path, model_aliases={}, idle_timeout=60)
    await models.recover()
    return dispatcher


async def test_pending_futures_are_redispatched_to_a_live_trainer(tmp_path: Path) -> None:
    sync, repo, futures = _store_with_a_ready_run(tmp_path)
    records = {}
    for seq in (1, 2, 3, 4):  # as the previous gateway left them: 1 done, 2-3 forwarded, 4 not yet
        records[seq] = await _submit(futures, seq)
        if seq <= 3:
            sync.set_trainer_seq(records[seq].request_id, seq)
    await futures.complete(records[1], b"{}", "application/json")
    trainer = FakeTrainer()
    trainer.ops, trainer.last = {1: b"{}", 2: b"{}", 3: b"{}"}, 1
    dispatcher = await _restart_gateway(repo, futures, trainer, tmp_path)
    for seq in (2, 3, 4):
        done = await asyncio.wait_for(futures.wait("t", records[seq].request_id, timeout=5), 10)
        assert done.state == FutureState.COMPLETE
    assert trainer.puts == [("boot-1", 2), ("boot-1", 3), ("boot-1", 4)]
    await dispatcher.close()
    sync.close()


async def test_a_later_chunk_stored_before_an_earlier_one_waits_for_it(tmp_path: Path) -> None:
    """forward_backward chunks arrive first chunk last: after a restart (or a replica takeover) with seq 2
    stored and seq 1 still on its way, seq 2 must wait for seq 1."""
    sync, repo, futures = _store_with_a_ready_run(tmp_path)
    second = await _submit(futures, 2)
    trainer = FakeTrainer()
    dispatcher = await _restart_gateway(repo, futures, trainer, tmp_path)
    assert (await futures.wait("t", second.request_id, timeout=0.5)).state == FutureState.PENDING
    assert trainer.puts == []
    first = await _submit(futures, 1)
    dispatcher.enqueue(first)
    assert (await asyncio.wait_for(futures.wait("t", second.request_id, timeout=5), 10)).state == "complete"
    assert trainer.puts == [("boot-1", 1), ("boot-1", 2)]
    await dispatcher.close()
    sync.close()
