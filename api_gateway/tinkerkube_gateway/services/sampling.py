"""Sampling sessions and asample, routed per DESIGN.md "What runs where".

- Ephemeral snapshots (`save_weights_and_get_sampling_client`) and named sampler weights of a LIVE
  run are served by that run's own trainer (`SampleOp.snapshot_id` = sampler id or tinker path).
- Base-model sampling, or a checkpoint whose trainer is gone, starts a sampler process group
  (spec mode=sample, restore_from=path), shared by the tenant's sampling clients of the same weights.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tinkerkube_contract import paths, pod_api
from tinkerkube_contract.resource import LoraSpec, SessionMode
from tinkerkube_gateway.clients.pod_client import OpRejected, TrainerUnreachable
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.errors import InvalidRequest, UnknownModel
from tinkerkube_gateway.schemas import CreateSamplingSessionRequest, SampleRequest
from tinkerkube_gateway.services.admission import SampleAdmission, Ticket
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.image_assets import ImageAssets
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.services.usage import prompt_length, sampled_tokens
from tinkerkube_gateway.store.protocol import CLONE_STRIDE
from tinkerkube_gateway.store.records import LIVE, FutureOp, FutureRecord, FutureState, ModelRecord, SamplerRecord
from tinkerkube_gateway.wire import json_bytes

log = logging.getLogger(__name__)
STOP_WAIT_SECONDS = 5.0  # how long a cancel waits to find the sample's trainer


class SamplingService:
    def __init__(self, *, futures: FuturesService, sessions: SessionsService, models: ModelsService,
                 registry: RegistryService, dispatcher: Dispatcher, max_sample_tokens: int,
                 admission: SampleAdmission | None = None, assets: ImageAssets | None = None):
        self.assets = assets  # None: image asset pointers are refused (wire.check_prompt)
        self.max_sample_tokens = max_sample_tokens  # tokens one request may generate, over all its samples
        self.admission = admission  # None: every sample starts at once (no backpressure)
        self.futures = futures
        self.sessions = sessions
        self.models = models
        self.registry = registry
        self.dispatcher = dispatcher

    async def create_session(self, tenant: str, req: CreateSamplingSessionRequest) -> tuple[str, bool]:
        """The sampler's id, and whether this call created it (False: a retry of the same create)."""
        session = await self.sessions.get_active(tenant, req.session_id)
        sampler_id = paths.sampler_id_for(session.session_id, req.sampling_session_seq_id)
        existing = await self.models.repo.get_sampler(sampler_id)
        if existing is not None:
            return sampler_id, False
        if req.model_path:
            await self._from_path(tenant, sampler_id, req.model_path)
        elif req.base_model:
            await self._from_base(tenant, session.session_id, sampler_id, req.base_model)
        else:
            raise InvalidRequest("create_sampling_session needs base_model or model_path")
        return sampler_id, True

    async def _from_path(self, tenant: str, sampler_id: str, model_path: str) -> None:
        checkpoint = await self.registry.resolve_loadable(tenant, model_path)
        run = await self.models.repo.get_model(checkpoint.run_id)
        if run is None:
            raise UnknownModel(f"the training run of {model_path} is unknown")
        session_id = sampler_id.rsplit(":sample:", 1)[0]
        live = await self.models.adopt(run.model_id) or await self._dispatched_elsewhere(run.model_id)
        if live and checkpoint.kind == paths.CheckpointKind.SAMPLER_WEIGHTS and run.tenant == tenant:
            await self._add(run, sampler_id, session_id, snapshot_id=checkpoint.tinker_path, model_path=model_path)
            return
        backing = await self._sampler_process(tenant, session_id, sampler_id, run.base_model,
                                              LoraSpec.model_validate(run.lora or {}), restore_from=model_path)
        await self._add(backing, sampler_id, session_id, snapshot_id=None, model_path=model_path)

    async def _from_base(self, tenant: str, session_id: str, sampler_id: str, base_model: str) -> None:
        backing = await self._sampler_process(tenant, session_id, sampler_id, base_model, LoraSpec(),
                                              restore_from=None)
        await self._add(backing, sampler_id, session_id, snapshot_id=None, model_path=None)

    async def _add(self, backing: ModelRecord, sampler_id: str, session_id: str, *, snapshot_id: str | None,
                   model_path: str | None) -> None:
        await self.models.repo.insert_sampler(
            sampler_id=sampler_id, session_id=session_id, tenant=backing.tenant, base_model=backing.base_model,
            model_path=model_path, backing_model_id=backing.model_id, snapshot_id=snapshot_id,
            created_at=backing.created_at)

    async def _sampler_process(self, tenant: str, session_id: str, sampler_id: str, base_model: str,
                               lora: LoraSpec, restore_from: str | None) -> ModelRecord:
        base_model = self.models.base_model(base_model)
        key = restore_from or f"base:{base_model}"
        found = await self.models.repo.find_sampler_process(tenant, key)
        if found is not None and (await self.models.adopt(found.model_id)
                                  or await self._dispatched_elsewhere(found.model_id)):
            return found
        process_id = sampler_id.replace(":sample:", ":sampler:")  # sample futures are keyed by sampler_id
        spec = self.models.spec_for(model_id=process_id, tenant=tenant, session_id=session_id, base_model=base_model,
                                    lora=lora, mode=SessionMode.SAMPLE, restore_from=restore_from)
        await self.models.launch(tenant, spec, FutureOp.START_SAMPLER, None, None, weights_key=key)
        record = await self.models.repo.get_model(process_id)
        assert record is not None
        return record

    async def _dispatched_elsewhere(self, model_id: str) -> bool:
        """Live, and another gateway replica holds its lease (so `adopt` did not take it)."""
        record = await self.models.repo.get_model(model_id)
        return (self.models.replicas.multi and record is not None and record.status in LIVE
                and await self.dispatcher.backend.handle(model_id) is not None)

    async def get_owned(self, tenant: str, sampler_id: str) -> SamplerRecord:
        record = await self.models.repo.get_sampler(sampler_id)
        if record is None or record.tenant != tenant:
            raise UnknownModel(f"unknown sampler {sampler_id!r}")
        return record

    async def join(self, tenant: str, sampler_id: str) -> int:
        """A clone id for an unpickled SamplingClient of the tenant's sampling session: 1, 2, ... from a
        counter in the store, so no two clients (on any replica, after any restart) number samples alike."""
        await self.get_owned(tenant, sampler_id)
        clone = await self.models.repo.next_clone(sampler_id)
        if clone >= CLONE_STRIDE:
            raise InvalidRequest(f"sampling session {sampler_id!r} has had {CLONE_STRIDE - 1} clients join it, the "
                                 "most its seq_id numbering allows; create a new sampling session")
        return int(clone)

    async def describe(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        record = await self.get_owned(tenant, sampler_id)
        return {"sampler_id": record.sampler_id, "base_model": record.base_model, "model_path": record.model_path}

    async def sample(self, tenant: str, req: SampleRequest, raw: dict[str, Any]) -> tuple[FutureRecord, list[str]]:
        if not req.sampling_session_id:
            raise InvalidRequest("asample needs sampling_session_id (create a sampling session first)")
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None and req.num_samples * max_tokens > self.max_sample_tokens:
            raise InvalidRequest(f"num_samples * max_tokens = {req.num_samples} * {max_tokens} exceeds the "
                                 f"{self.max_sample_tokens} tokens one sample request may generate here")
        _check_prompt_alt_tokens(req.prompt_alt_tokens_k, raw.get("prompt"))
        sampler = await self.get_owned(tenant, req.sampling_session_id)
        if self.admission is not None:  # a 429 before anything is recorded: the SDK resends this seq_id
            self.admission.check(tenant, self.dispatcher.pool_of(sampler.backing_model_id))
        if self.assets is not None:  # pointers become image bytes before anything is stored: a replay never fetches
            await self.assets.resolve_prompt(raw.get("prompt"))
        fut, created = await self.futures.create(tenant=tenant, session_id=sampler.session_id,
                                                 target_id=sampler.sampler_id, seq_id=req.seq_id, op=FutureOp.SAMPLE,
                                                 body=json_bytes(raw), body_type=pod_api.CONTENT_JSON)
        if created:
            await self.models.adopt(sampler.backing_model_id)
            await self.models.replicas.track_sample(fut.request_id)
            op = pod_api.SampleOp(request=raw, model_id=sampler.backing_model_id, snapshot_id=sampler.snapshot_id)
            self._dispatch(fut, sampler.backing_model_id, op, _cost(req))
        return fut, [f"{fut.request_id}:{i}" for i in range(req.num_samples)]

    async def _still_pending(self, request_id: str) -> bool:
        fut = await self.models.repo.get_future(request_id)
        return fut is not None and fut.state == FutureState.PENDING

    async def withdraw(self, request_id: str) -> bool:
        """Takes back a sample (a cancel): True when it never started (it waited in the gateway); else its
        trainer is told to stop it, so that its rows leave the decode at the next step."""
        if self.admission is not None and self.admission.withdraw(request_id):
            await self.models.replicas.untrack_sample(request_id)  # it will not run here: nobody is to re-run it
            return True
        await self._stop_on_trainer(request_id)
        return False

    async def _stop_on_trainer(self, request_id: str) -> None:
        """Best effort: a trainer that is gone, or never got the sample, has nothing to stop."""
        fut = await self.models.repo.get_future(request_id)
        sampler = None if fut is None else await self.models.repo.get_sampler(fut.target_id)
        if sampler is None:
            return
        try:
            handle = await asyncio.wait_for(self.dispatcher.trainer_handle(sampler.backing_model_id), STOP_WAIT_SECONDS)
            await self.dispatcher.pods.cancel_sample(handle, request_id)
        except (OpRejected, TrainerUnreachable, TimeoutError) as exc:
            log.info("could not stop sample %s on its trainer: %s", request_id, exc)

    def _dispatch(self, fut: FutureRecord, backing_model_id: str, op: pod_api.SampleOp, cost: int) -> None:
        if self.admission is None:
            self.dispatcher.submit_sample(fut, backing_model_id, op)
            return

        async def run(waited: bool) -> int | None:
            if waited and self.models.replicas.multi and not await self._still_pending(fut.request_id):
                await self.models.replicas.untrack_sample(fut.request_id)  # cancelled on another replica
                return None
            result = await self.dispatcher.run_sample(fut, backing_model_id, op)
            return None if result is None else sampled_tokens(result.body, result.content_type)

        self.admission.admit(Ticket(fut.request_id, fut.tenant, self.dispatcher.pool_of(backing_model_id), cost, run))

    async def resume(self, request_id: str) -> None:
        """A sample whose gateway replica died while it ran: run it again here (sampling changes no state,
        and the trainer answers a repeated request id from its results)."""
        repo = self.models.repo
        fut = await repo.get_future(request_id)
        sampler = None if fut is None else await repo.get_sampler(fut.target_id)
        if fut is None or sampler is None or fut.state != FutureState.PENDING or fut.body is None:
            await self.models.replicas.untrack_sample(request_id)
            return
        log.warning("re-running sample %s: the gateway replica running it stopped", request_id)
        await self.models.adopt(sampler.backing_model_id)
        raw = json.loads(fut.body)
        op = pod_api.SampleOp(request=raw, model_id=sampler.backing_model_id, snapshot_id=sampler.snapshot_id)
        self._dispatch(fut, sampler.backing_model_id, op, _cost(SampleRequest.model_validate(raw)))


def _cost(req: SampleRequest) -> int:
    """The most tokens a request can generate: what it reserves of its tenant's tokens per minute."""
    max_tokens = req.sampling_params.max_tokens
    return req.num_samples * (pod_api.DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)


def _check_prompt_alt_tokens(k: int, prompt: Any) -> None:
    """`prompt_alt_tokens_k` answers (len(prompt) - 1) * k draws: refused over the contract's cap before
    anything is stored (the trainer checks again, counting image tokens exactly)."""
    cells = max(prompt_length(prompt) - 1, 0) * k
    if cells > pod_api.MAX_PROMPT_ALT_TOKEN_CELLS:
        raise InvalidRequest(f"prompt_alt_tokens_k asks for (len(prompt) - 1) * k = {cells} draws; at most "
                             f"{pod_api.MAX_PROMPT_ALT_TOKEN_CELLS} per request: lower k or send a shorter prompt")
