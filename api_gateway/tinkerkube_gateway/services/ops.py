"""Training op submission.

`submit` is the one sequence every training route uses: check the model is the tenant's, record the
future idempotently under `(model_id, seq_id)`, hand it to the model's worker. A request refused on the
way still uses its seq_id: the edge calls `refuse` (errors.py's refusal hook), which records it failed,
so later ops of the run do not wait for it. Results come back through services/results.py.
"""

from __future__ import annotations

from typing import Any

from tinkerkube_contract import paths, pod_api
from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.errors import GatewayError, InvalidRequest, SeqIdTooFarAhead, UnknownModel
from tinkerkube_gateway.schemas import (
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.store.records import FutureOp, FutureRecord, ModelStatus
from tinkerkube_gateway.wire import CheckedForwardBackward

JSON = pod_api.CONTENT_JSON


class OpsService:
    def __init__(self, *, futures: FuturesService, models: ModelsService, registry: RegistryService,
                 dispatcher: Dispatcher):
        self.futures = futures
        self.models = models
        self.registry = registry
        self.dispatcher = dispatcher

    async def submit(self, tenant: str, model_id: str, seq_id: int, op: FutureOp, body: bytes, body_type: str,
                     meta: dict[str, Any] | None = None) -> FutureRecord:
        expected = self.dispatcher.too_far_ahead(model_id, seq_id)
        if expected is not None:
            raise SeqIdTooFarAhead(f"seq_id {seq_id} is more than {self.dispatcher.max_ahead} ahead of "
                                   f"{model_id}'s next expected seq_id {expected}; send the ops before it first")
        model, fut, created = await self.futures.create_op(tenant=tenant, model_id=model_id, seq_id=seq_id,
                                                           op=op, body=body, body_type=body_type, meta=meta)
        if model is None or fut is None:
            raise UnknownModel(f"unknown model_id {model_id!r}")
        if not created:
            return fut
        if model.status in (ModelStatus.FAILED, ModelStatus.STOPPED):
            category = ErrorCategory.SERVER if model.status == ModelStatus.FAILED else ErrorCategory.USER
            await self.futures.fail(fut, model.error or f"model {model_id} is {model.status}", category)
            return fut
        if model_id in self.dispatcher.workers or await self.models.adopt(model_id):
            self.dispatcher.enqueue(fut)  # idempotent: an adoption may have queued it already
        else:
            await self.models.replicas.submitted(model_id)  # another replica dispatches it: wake it there
        return fut

    async def refuse(self, tenant: str, model_id: str, seq_id: int, op: FutureOp, problem: str) -> None:
        """A refused request still used its seq_id: record it failed so later ops do not wait for it."""
        try:
            model = await self.models.get_owned(tenant, model_id)
        except GatewayError:
            return  # not the tenant's run: nothing of it is touched
        fut = await self.futures.refuse(tenant=tenant, session_id=model.session_id, target_id=model_id,
                                        seq_id=seq_id, op=op, problem=problem)
        if fut is None:
            return  # the seq_id has a future already
        if model_id in self.dispatcher.workers:
            self.dispatcher.enqueue(fut)
        else:
            await self.models.replicas.submitted(model_id)  # the dispatching replica skips its seq_id

    async def forward_backward(self, tenant: str, checked: CheckedForwardBackward) -> FutureRecord:
        return await self.submit(tenant, checked.model_id, checked.seq_id, FutureOp.FORWARD_BACKWARD, checked.plain,
                                 pod_api.CONTENT_PROTOBUF, meta={"tokens": checked.tokens})

    async def optim_step(self, tenant: str, req: OptimStepRequest) -> FutureRecord:
        if req.adam_params is None and req.optimizer_params is not None:
            raise InvalidRequest(f"optimizer {req.optimizer_params.get('type')!r} is not supported; use AdamParams")
        op = pod_api.OptimStepOp(adam_params=req.adam_params or pod_api.AdamParams())
        return await self.submit(tenant, req.model_id, req.seq_id, FutureOp.OPTIM_STEP,
                                 op.model_dump_json().encode(), JSON)

    async def save_weights(self, tenant: str, req: SaveWeightsRequest) -> FutureRecord:
        model = await self.models.get_owned(tenant, req.model_id)
        name = paths.validate_name(req.path or f"step-{req.seq_id}")
        await self.registry.check_free(model, paths.CheckpointKind.WEIGHTS, name, overwrite=req.overwrite)
        body = pod_api.SaveStateOp(name=name).model_dump_json().encode()
        meta = {"ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        return await self.submit(tenant, req.model_id, req.seq_id, FutureOp.SAVE_STATE, body, JSON, meta)

    async def save_for_sampler(self, tenant: str, req: SaveWeightsForSamplerRequest) -> FutureRecord:
        model = await self.models.get_owned(tenant, req.model_id)
        if req.path is not None:
            name = paths.validate_name(req.path)
            await self.registry.check_free(model, paths.CheckpointKind.SAMPLER_WEIGHTS, name, overwrite=True)
            op = pod_api.SaveSamplerWeightsOp(name=name)
            meta: dict[str, Any] = {"ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        elif req.sampling_session_seq_id is not None:
            sampler_id = paths.sampler_id_for(model.session_id, req.sampling_session_seq_id)
            await self.registry.add_sampler(model, sampler_id, snapshot_id=sampler_id)
            op = pod_api.SaveSamplerWeightsOp(snapshot_id=sampler_id)
            meta = {"sampler_id": sampler_id}
        else:
            raise InvalidRequest("save_weights_for_sampler needs a path (named) or a sampling_session_seq_id")
        return await self.submit(tenant, req.model_id, req.seq_id, FutureOp.SAVE_SAMPLER_WEIGHTS,
                                 op.model_dump_json().encode(), JSON, meta)

    async def save_external(self, tenant: str, req: SaveWeightsExternalRequest) -> FutureRecord:
        """The adapter as downloadable files (`tinker://<run>/external_weights/<name>`), replacing an
        export of that name; encrypted to the age recipients when the request names any."""
        await self.models.get_owned(tenant, req.model_id)
        op = pod_api.SaveExternalWeightsOp(name=paths.validate_name(req.path),
                                           age_recipients=req.age_encryption_recipients or [])
        meta = {"ttl_seconds": req.ttl_seconds}
        return await self.submit(tenant, req.model_id, req.seq_id, FutureOp.SAVE_WEIGHTS_EXTERNAL,
                                 op.model_dump_json().encode(), JSON, meta)

    async def load_weights(self, tenant: str, req: LoadWeightsRequest, granted_by: str | None = None) -> FutureRecord:
        """`granted_by`: the tenant whose API key came as the weights access token (its checkpoints read)."""
        checkpoint = await self.registry.resolve_loadable(tenant, req.path, granted_by)
        if req.optimizer and checkpoint.kind != paths.CheckpointKind.WEIGHTS:
            raise InvalidRequest(f"{req.path} holds no optimizer state (only save_state checkpoints do); load it "
                                 "with optimizer=False")
        if req.model_id is None:
            return await self.models.create_from_checkpoint(tenant, req, checkpoint)
        if req.seq_id is None:
            raise InvalidRequest("load_weights on an existing model needs seq_id")
        if req.base_model is not None or req.optimizer_config is not None:
            raise InvalidRequest("load_weights into an existing run cannot change its base model or optimizer; "
                                 "create a new training client from the checkpoint instead")
        body = pod_api.LoadStateOp(path=checkpoint.tinker_path, with_optimizer=req.optimizer).model_dump_json()
        return await self.submit(tenant, req.model_id, req.seq_id, FutureOp.LOAD_STATE, body.encode(), JSON,
                                 {"path": checkpoint.tinker_path})
