"""Training runs (models): create_model, create-via-load_weights, get_info, stopping, restart recovery.

Model ids are `{session_id}:train:{model_seq_id}` (the SDK derives them itself, §0.8). Each run gets
its own trainer process group through the SessionBackend; its create future completes when the
trainer is ready. The create submit is keyed `(model_id, 0)`, so a retried create returns its future.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from tinkerkube_contract import paths
from tinkerkube_contract.models import base_model_name, resolve_model
from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_contract.resource import LoraSpec, SessionMode, TrainingSessionSpec
from tinkerkube_gateway.backends.base import SessionBackend
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.errors import InvalidRequest, UnknownCheckpoint, UnknownModel
from tinkerkube_gateway.scheduling import first_expected_seq
from tinkerkube_gateway.schemas import CreateModelRequest, LoadWeightsRequest, LoraConfig
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.replicas import Replicas
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.store.records import (
    CREATE_OPS,
    LIVE,
    CheckpointRecord,
    FutureOp,
    FutureRecord,
    FutureState,
    ModelRecord,
    ModelStatus,
)
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)


class ModelsService:
    def __init__(self, *, repo: AsyncRepo, futures: FuturesService, sessions: SessionsService,
                 dispatcher: Dispatcher, backend: SessionBackend, model_cache_dir: Path,
                 model_aliases: dict[str, str], idle_timeout: float, spec_defaults: dict[str, Any] | None = None,
                 replicas: Replicas | None = None):
        self.repo = repo
        self.replicas = replicas or Replicas(repo, replica_id=dispatcher.replica_id)  # the only replica
        self._taking: dict[str, asyncio.Lock] = {}
        self.futures = futures
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.backend = backend
        self.model_cache_dir = model_cache_dir
        self.model_aliases = model_aliases
        self.idle_timeout = idle_timeout
        self.spec_defaults = spec_defaults or {}  # placement: replicas, procs_per_pod, resources, ...

    async def get_owned(self, tenant: str, model_id: str, *, kind: SessionMode = SessionMode.TRAIN) -> ModelRecord:
        record = await self.repo.get_model(model_id)
        if record is None or record.tenant != tenant or record.kind != kind:
            raise UnknownModel(f"unknown model_id {model_id!r}")
        return record

    def base_model(self, name: str) -> str:
        """The base model a requested name runs on (`org/model:peft:262144` → `org/model`): what pools,
        trainers and records use, so that every variant name of a model shares its pools."""
        return base_model_name(name, self.model_aliases)

    def spec_for(self, *, model_id: str, tenant: str, session_id: str, base_model: str, lora: LoraSpec,
                 mode: SessionMode = SessionMode.TRAIN, restore_from: str | None = None,
                 restore_optimizer: bool = False) -> TrainingSessionSpec:
        return TrainingSessionSpec(
            base_model=self.base_model(base_model), lora=lora, mode=mode, model_id=model_id, restore_from=restore_from,
            restore_optimizer=restore_optimizer, owner=tenant, tinker_session=session_id,
            **{"idle_timeout_seconds": int(self.idle_timeout), **self.spec_defaults})

    async def create_model(self, tenant: str, req: CreateModelRequest) -> tuple[FutureRecord, bool]:
        """The run's create future, and whether this call created it (False: a retry of the same create)."""
        await self.sessions.get_active(tenant, req.session_id)
        model_id = paths.model_id_for(req.session_id, req.model_seq_id)
        lora_cfg = req.lora_config or LoraConfig()
        lora = LoraSpec(rank=lora_cfg.rank, alpha=float(lora_cfg.rank), train_mlp=lora_cfg.train_mlp,
                        train_attn=lora_cfg.train_attn, train_unembed=lora_cfg.train_unembed, seed=lora_cfg.seed)
        spec = self.spec_for(model_id=model_id, tenant=tenant, session_id=req.session_id,
                             base_model=req.base_model, lora=lora)
        return await self.launch(tenant, spec, FutureOp.CREATE_MODEL, req.user_metadata, req.optimizer_config)

    async def create_from_checkpoint(self, tenant: str, req: LoadWeightsRequest,
                                     checkpoint: CheckpointRecord) -> FutureRecord:
        """Create-via-load: the new run takes its base model and LoRA config from the checkpoint's run. A
        `base_model` override may name a variant of that model (another context length), nothing else;
        `optimizer_config` sets the optimizer of a weights-only load (default Adam), never one whose
        optimizer state is restored."""
        if req.session_id is None or req.model_seq_id is None:
            raise InvalidRequest("load_weights needs either model_id + seq_id or session_id + model_seq_id")
        await self.sessions.get_active(tenant, req.session_id)
        source = await self.repo.get_model(checkpoint.run_id)
        if source is None:
            raise UnknownCheckpoint(f"the training run of {req.path} is unknown")
        base = self.base_model(source.base_model)
        if req.base_model is not None and self.base_model(req.base_model) != base:
            raise InvalidRequest(f"base_model {req.base_model!r} does not fit {req.path}, which was trained on "
                                 f"{source.base_model!r}; an override may only name a variant of it, such as "
                                 f"{base}:peft:<context length>")
        if req.optimizer and req.optimizer_config is not None:
            raise InvalidRequest("optimizer_config cannot replace the optimizer whose state optimizer=True restores; "
                                 "load without the optimizer state to choose one")
        model_id = paths.model_id_for(req.session_id, req.model_seq_id)
        spec = self.spec_for(model_id=model_id, tenant=tenant, session_id=req.session_id, base_model=base,
                             lora=LoraSpec.model_validate(source.lora or {}), restore_from=checkpoint.tinker_path,
                             restore_optimizer=req.optimizer)
        metadata = req.user_metadata if req.user_metadata is not None else source.user_metadata
        optimizer_config = source.optimizer_config if req.optimizer else req.optimizer_config
        return (await self.launch(tenant, spec, FutureOp.LOAD_WEIGHTS_CREATE, metadata, optimizer_config))[0]

    async def launch(self, tenant: str, spec: TrainingSessionSpec, op: FutureOp, user_metadata: dict[str, Any] | None,
                      optimizer_config: dict[str, Any] | None,
                      weights_key: str | None = None) -> tuple[FutureRecord, bool]:
        """Start the run of `spec` once: a retried create (same model id) gets the first call's future and
        False, so that nothing downstream of it (the pod, the audit entry) happens twice."""
        fut, created = await self.futures.create(tenant=tenant, session_id=spec.tinker_session,
                                                 target_id=spec.model_id, seq_id=0, op=op,
                                                 meta={"path": spec.restore_from})
        if not created:
            return fut, False
        epoch = await self.replicas.claim(spec.model_id)  # before the run is live: no replica takes it over
        now = time.time()
        await self.repo.insert_model(
            model_id=spec.model_id, session_id=spec.tinker_session, tenant=tenant, kind=spec.mode.value,
            base_model=spec.base_model, lora=spec.lora.model_dump(), user_metadata=user_metadata,
            optimizer_config=optimizer_config, restore_from=spec.restore_from, weights_key=weights_key,
            status=ModelStatus.STARTING, error=None, created_at=now, last_request_time=now)
        await self.backend.start(spec)
        self.dispatcher.launch(spec.model_id, [fut], epoch=epoch)
        return fut, True

    def model_data(self, record: ModelRecord) -> dict[str, Any]:
        source = resolve_model(record.base_model, aliases=self.model_aliases, cache_dir=self.model_cache_dir)
        tokenizer = str(source.local_dir) if source.local_dir is not None else record.base_model
        return {"model_name": record.base_model, "tokenizer_id": tokenizer, "arch": "lora"}

    async def get_info(self, tenant: str, model_id: str) -> dict[str, Any]:
        record = await self.get_owned(tenant, model_id)
        lora = record.lora or {}
        return {"model_id": model_id, "model_data": self.model_data(record), "is_lora": True,
                "lora_rank": lora.get("rank"), "model_name": record.base_model, "type": "get_info",
                **({"optimizer_config": record.optimizer_config} if record.optimizer_config else {})}

    async def keep_session_alive(self, session_id: str) -> None:
        """On heartbeat: the session's live training runs are in use even when no op is running."""
        if self.futures.mirror is None:
            return
        runs = await self.repo.list_models(session_id=session_id, live_only=True)
        self.futures.mirror.keepalive([r.model_id for r in runs if r.kind == SessionMode.TRAIN])

    async def stop_session_runs(self, session_id: str, reason: str) -> None:
        """The session's runs stop; a shared sampler process stops with its last user (any session that
        holds a sampling client on it), whichever session started it."""
        for record in await self.repo.list_models(session_id=session_id, live_only=True):
            if record.kind == SessionMode.SAMPLE and await self.repo.sampler_users(record.model_id) > 0:
                continue
            await self._stop(record.model_id, reason)
        for sampler in await self.repo.list_samplers(session_id):
            backing = await self.repo.get_model(sampler.backing_model_id)
            if (backing is not None and backing.kind == SessionMode.SAMPLE and backing.session_id != session_id
                    and backing.status in LIVE and await self.repo.sampler_users(backing.model_id) == 0):
                await self._stop(backing.model_id, f"its last sampling session ended: {reason}")

    async def _stop(self, model_id: str, reason: str) -> None:
        await self.repo.update_model(model_id, status=ModelStatus.STOPPED, error=reason)
        await self.dispatcher.stop_model(model_id, reason)
        await self.replicas.release(model_id)

    async def recover(self) -> None:
        """Gateway start: every pending future is re-dispatched (its trainer still runs: Kubernetes) or
        failed with a clear retryable error (its trainer died with the previous gateway: local)."""
        pending = await self.repo.pending_futures()
        targets: dict[str, list[FutureRecord]] = {}
        for fut in pending:
            targets.setdefault(fut.target_id, []).append(fut)
        for record in await self.repo.list_models(live_only=True):
            targets.setdefault(record.model_id, [])
        for target_id, futs in targets.items():
            if await self.repo.get_model(target_id) is None:  # samples: their task died with the gateway
                if not self.replicas.multi:  # (with several replicas, another one may be running them)
                    await self._recover_target(target_id, futs, None)
            else:
                await self._take(target_id, futs)  # unless another replica dispatches it

    async def adopt(self, model_id: str, *, wait: bool = True) -> bool:
        """Whether this replica dispatches the run now. A live run with no worker here is taken over from
        the store, as after a restart, when no other replica holds its lease (it died or stopped).
        `wait=False`: give up at once when this replica is already taking it over (heartbeat)."""
        if model_id in self.dispatcher.workers:
            return True
        record = await self.repo.get_model(model_id)
        if record is None or record.status not in LIVE:
            return False
        return await self._take(model_id, None, wait=wait)

    async def _take(self, model_id: str, futs: list[FutureRecord] | None, *, wait: bool = True) -> bool:
        lock = self._taking.setdefault(model_id, asyncio.Lock())
        if lock.locked() and not wait:
            return False
        try:
            async with lock:  # one takeover at a time: a second claim would fence off the first worker
                if model_id in self.dispatcher.workers:
                    return True
                epoch = await self.replicas.claim(model_id)
                if epoch is None:
                    return False
                if futs is None:
                    futs = await self.repo.futures_for_target(model_id, pending_only=True)
                await self._recover_target(model_id, futs, epoch)
                if model_id in self.dispatcher.workers:
                    return True
                await self.replicas.release(model_id)
                return False
        finally:
            if not lock.locked():
                self._taking.pop(model_id, None)

    async def _recover_target(self, target_id: str, futs: list[FutureRecord], epoch: int | None) -> None:
        record = await self.repo.get_model(target_id)
        alive = record is not None and await self.backend.handle(target_id) is not None
        if record is None or not alive:
            reason = (f"the gateway restarted and the trainer for {target_id} is no longer running; "
                      "retry (recreate the client from your last checkpoint)")
            for fut in futs:
                await self.futures.fail(fut, reason, ErrorCategory.SERVER)
            if record is not None and record.status in LIVE:
                await self.repo.update_model(target_id, status=ModelStatus.STOPPED, error=reason)
            return
        passed = [f.seq_id for f in await self.repo.futures_for_target(target_id)
                  if f.seq_id is not None and (f.state != FutureState.PENDING or f.trainer_seq is not None)]
        ops = sorted((f for f in futs if f.seq_id is not None and f.op not in CREATE_OPS), key=lambda f: f.seq_id)
        resend = sorted((f for f in ops if f.trainer_seq is not None), key=lambda f: f.trainer_seq)
        fresh = [f for f in ops if f.trainer_seq is None]
        next_seq = first_expected_seq(passed)
        worker = self.dispatcher.launch(target_id, [f for f in futs if f.op in CREATE_OPS], next_seq=next_seq,
                                        trainer_next=await self.repo.max_trainer_seq(target_id) + 1, resend=resend,
                                        epoch=epoch)
        for fut in fresh:
            worker.enqueue(fut)
        await worker.refill()  # ops another replica persisted while this one was taking over
