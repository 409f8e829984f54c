"""Training op submission and result translation (the dispatcher's ResultSink).

`submit` is the one sequence every training route uses: check the model is the tenant's, record the
future idempotently under `(model_id, seq_id)`, hand it to the model's worker. Trainer results come
back as pod_api shapes and are turned into what the SDK expects (tinker-protocol.md §2.4); saved
checkpoints are registered on the way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import ValidationError

from tinkerkube_contract import paths, pod_api
from tinkerkube_contract.pod_api import ErrorCategory, OpKind, OpState
from tinkerkube_gateway.backends.base import TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpResult
from tinkerkube_gateway.dispatcher import Dispatcher, is_protobuf
from tinkerkube_gateway.errors import GatewayError, InvalidRequest, NotFound, UnknownModel
from tinkerkube_gateway.schemas import (
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.store.records import FutureRecord, FutureState, ModelRecord, ModelStatus
from tinkerkube_gateway.wire import json_bytes

JSON = pod_api.CONTENT_JSON


class OpsService:
    def __init__(self, *, futures: FuturesService, models: ModelsService, registry: RegistryService,
                 dispatcher: Dispatcher):
        self.futures = futures
        self.models = models
        self.registry = registry
        self.dispatcher = dispatcher
        dispatcher.bind(self)

    async def submit(self, tenant: str, model_id: str, seq_id: int, op: OpKind, body: bytes, body_type: str,
                     meta: dict[str, Any] | None = None) -> FutureRecord:
        model, fut, created = await self.futures.create_op(tenant=tenant, model_id=model_id, seq_id=seq_id,
                                                           op=op.value, body=body, body_type=body_type, meta=meta)
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

    async def skip(self, tenant: str, model_id: str, seq_id: int, op: OpKind, problem: str) -> None:
        """A rejected op still used its seq_id: record it failed so later ops do not wait for it."""
        model = await self.repo_model(tenant, model_id)
        if model is None:
            return
        fut, created = await self.futures.create(tenant=tenant, session_id=model.session_id, target_id=model_id,
                                                 seq_id=seq_id, op=op.value, meta={"rejected": problem})
        if created:
            await self.futures.fail(fut, problem, ErrorCategory.USER)
            fut = dataclasses.replace(fut, state=FutureState.FAILED)
            if model_id in self.dispatcher.workers:
                self.dispatcher.enqueue(fut)
            else:
                await self.models.replicas.submitted(model_id)  # the dispatching replica skips its seq_id

    async def repo_model(self, tenant: str, model_id: str) -> ModelRecord | None:
        try:
            return await self.models.get_owned(tenant, model_id)
        except GatewayError:
            return None

    async def _guarded(self, tenant: str, model_id: str, seq_id: int, op: OpKind, make: Any) -> FutureRecord:
        try:
            return await make()
        except (InvalidRequest, NotFound, paths.InvalidTinkerPath) as exc:
            await self.skip(tenant, model_id, seq_id, op, str(exc))
            raise

    async def forward_backward(self, tenant: str, model_id: str, seq_id: int, raw: bytes,
                               problem: str | None = None) -> FutureRecord:
        async def make() -> FutureRecord:
            if problem is not None:
                raise InvalidRequest(problem)
            return await self.submit(tenant, model_id, seq_id, OpKind.FORWARD_BACKWARD, raw, pod_api.CONTENT_PROTOBUF)

        return await self._guarded(tenant, model_id, seq_id, OpKind.FORWARD_BACKWARD, make)

    async def optim_step(self, tenant: str, req: OptimStepRequest) -> FutureRecord:
        return await self._guarded(tenant, req.model_id, req.seq_id, OpKind.OPTIM_STEP,
                                   lambda: self._optim_step(tenant, req))

    async def _optim_step(self, tenant: str, req: OptimStepRequest) -> FutureRecord:
        if req.adam_params is None and req.optimizer_params is not None:
            raise InvalidRequest(f"optimizer {req.optimizer_params.get('type')!r} is not supported; use AdamParams")
        op = pod_api.OptimStepOp(adam_params=req.adam_params or pod_api.AdamParams())
        return await self.submit(tenant, req.model_id, req.seq_id, OpKind.OPTIM_STEP, op.model_dump_json().encode(),
                                 JSON)

    async def save_weights(self, tenant: str, req: SaveWeightsRequest) -> FutureRecord:
        return await self._guarded(tenant, req.model_id, req.seq_id, OpKind.SAVE_STATE,
                                   lambda: self._save_weights(tenant, req))

    async def _save_weights(self, tenant: str, req: SaveWeightsRequest) -> FutureRecord:
        model = await self.models.get_owned(tenant, req.model_id)
        name = paths.validate_name(req.path or f"step-{req.seq_id}")
        await self.registry.check_free(model, paths.CheckpointKind.WEIGHTS, name, overwrite=req.overwrite)
        body = pod_api.SaveStateOp(name=name).model_dump_json().encode()
        meta = {"ttl_seconds": req.ttl_seconds, "user_metadata": req.user_metadata}
        return await self.submit(tenant, req.model_id, req.seq_id, OpKind.SAVE_STATE, body, JSON, meta)

    async def save_for_sampler(self, tenant: str, req: SaveWeightsForSamplerRequest) -> FutureRecord:
        return await self._guarded(tenant, req.model_id, req.seq_id, OpKind.SAVE_SAMPLER_WEIGHTS,
                                   lambda: self._save_for_sampler(tenant, req))

    async def _save_for_sampler(self, tenant: str, req: SaveWeightsForSamplerRequest) -> FutureRecord:
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
        return await self.submit(tenant, req.model_id, req.seq_id, OpKind.SAVE_SAMPLER_WEIGHTS,
                                 op.model_dump_json().encode(), JSON, meta)

    async def load_weights(self, tenant: str, req: LoadWeightsRequest) -> FutureRecord:
        if req.model_id is None:
            return await self.models.create_from_checkpoint(tenant, req, self.registry.resolve_readable)
        if req.seq_id is None:
            raise InvalidRequest("load_weights on an existing model needs seq_id")
        model_id, seq_id = req.model_id, req.seq_id
        return await self._guarded(tenant, model_id, seq_id, OpKind.LOAD_STATE,
                                   lambda: self._load_state(tenant, req, model_id, seq_id))

    async def _load_state(self, tenant: str, req: LoadWeightsRequest, model_id: str, seq_id: int) -> FutureRecord:
        checkpoint = await self.registry.resolve_readable(tenant, req.path)
        body = pod_api.LoadStateOp(path=checkpoint.tinker_path, with_optimizer=req.optimizer).model_dump_json()
        return await self.submit(tenant, model_id, seq_id, OpKind.LOAD_STATE, body.encode(), JSON,
                                 {"path": checkpoint.tinker_path})

    # --- ResultSink ----------------------------------------------------------------------------------
    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None:
        await self.models.on_ready(model_id, handle)

    async def on_dead(self, model_id: str, reason: str) -> None:
        await self.models.on_dead(model_id, reason)

    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None:
        await self.futures.fail(fut, error, category)

    async def on_result(self, fut: FutureRecord, result: OpResult) -> None:
        if result.state is OpState.FAILED:
            failure = _failure(result.body)
            await self.futures.fail(fut, failure.error, failure.category)
            return
        try:
            body, content_type = await self._translate(fut, result)
        except (ValueError, ValidationError, KeyError) as exc:
            await self.futures.fail(fut, f"the trainer returned an unexpected result for {fut.op}: {exc}",
                                    ErrorCategory.SERVER)
            return
        await self.futures.complete(fut, body, content_type)

    async def _translate(self, fut: FutureRecord, result: OpResult) -> tuple[bytes, str]:
        meta = fut.meta or {}
        if fut.op in (OpKind.FORWARD_BACKWARD, OpKind.SAMPLE):
            if not is_protobuf(result):
                raise ValueError(f"expected protobuf, got {result.content_type}")
            return result.body, pod_api.CONTENT_PROTOBUF
        if fut.op == "create_model":
            return json_bytes({"model_id": fut.target_id, "type": "create_model"}), JSON
        if fut.op == "load_weights_create":
            return json_bytes({"model_id": fut.target_id, "path": meta.get("path"), "type": "load_weights"}), JSON
        if fut.op == OpKind.OPTIM_STEP:
            metrics = pod_api.OptimStepResult.model_validate_json(result.body).metrics
            return json_bytes({"metrics": metrics}), JSON
        if fut.op == OpKind.LOAD_STATE:
            return json_bytes({"model_id": fut.target_id, "path": meta.get("path"), "type": "load_weights"}), JSON
        saved = pod_api.SaveResult.model_validate_json(result.body)
        if fut.op == OpKind.SAVE_SAMPLER_WEIGHTS and meta.get("sampler_id"):
            return json_bytes({"sampling_session_id": meta["sampler_id"], "type": "save_weights_for_sampler"}), JSON
        if saved.checkpoint is None:
            raise ValueError("no checkpoint in the save result")
        await self.registry.register(fut, saved.checkpoint, meta)
        mirror = getattr(self.dispatcher.backend, "mirror_checkpoint", None)  # optional backend hook
        if mirror is not None:
            await mirror(fut.target_id, saved.checkpoint.tinker_path)
        kind = "save_weights" if fut.op == OpKind.SAVE_STATE else "save_weights_for_sampler"
        return json_bytes({"path": saved.checkpoint.tinker_path, "type": kind}), JSON


def _failure(body: bytes) -> pod_api.OpFailure:
    try:
        return pod_api.OpFailure.model_validate_json(body)
    except ValidationError:
        try:
            detail = json.loads(body).get("detail", body.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = body.decode(errors="replace")
        return pod_api.OpFailure(error=str(detail)[:4000], category=ErrorCategory.SERVER)
