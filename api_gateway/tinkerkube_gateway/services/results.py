"""What the dispatcher reports, recorded: trainer results turned into the SDK's shapes
(tinker-protocol.md §2.4), saved checkpoints registered (and mirrored where the backend wants them),
failures, runs becoming ready or dying, and sealed sequence gaps. The dispatcher's `ResultSink`.

Every method finishes its future whatever goes wrong on the way: an exception in here (a database or
Kubernetes API error while registering a checkpoint) fails that one op with a server error instead of
escaping into the run's poller, whose other futures would then wait forever.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from tinkerkube_contract import pod_api
from tinkerkube_contract.pod_api import ErrorCategory, OpState
from tinkerkube_gateway.backends.base import SessionBackend, TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpResult
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.replicas import Replicas
from tinkerkube_gateway.store.records import FutureOp, FutureRecord, ModelStatus
from tinkerkube_gateway.store.repo import AsyncRepo
from tinkerkube_gateway.wire import json_bytes

log = logging.getLogger(__name__)
JSON = pod_api.CONTENT_JSON
MirrorCheckpoint = Callable[[str, str], Awaitable[None]]  # (model_id, tinker_path): a backend's optional hook


class ResultsService:
    def __init__(self, *, repo: AsyncRepo, futures: FuturesService, registry: RegistryService, replicas: Replicas,
                 backend: SessionBackend, mirror_checkpoint: MirrorCheckpoint | None = None):
        self.repo = repo
        self.futures = futures
        self.registry = registry
        self.replicas = replicas
        self.backend = backend
        self.mirror_checkpoint = mirror_checkpoint

    async def on_ready(self, model_id: str, handle: TrainerHandle) -> None:
        await self.repo.update_model(model_id, status=ModelStatus.READY)

    async def on_dead(self, model_id: str, reason: str) -> None:
        await self.repo.update_model(model_id, status=ModelStatus.FAILED, error=reason[:4000])
        await self.backend.stop(model_id)
        await self.replicas.release(model_id)  # a failed run is nobody's to take over

    async def on_failure(self, fut: FutureRecord, error: str, category: ErrorCategory) -> None:
        await self.futures.fail(fut, error, category)

    async def on_result(self, fut: FutureRecord, result: OpResult) -> None:
        if result.state is OpState.FAILED:
            failure = _failure(result.body)
            await self.futures.fail(fut, failure.error, failure.category)
            return
        try:
            body = await self._translate(fut, result)
        except (ValueError, ValidationError, KeyError) as exc:
            await self.futures.fail(fut, f"the trainer returned an unexpected result for {fut.op}: {exc}",
                                    ErrorCategory.SERVER)
            return
        except Exception as exc:
            log.exception("recording the result of %s %s (seq %s) failed", fut.op, fut.target_id, fut.seq_id)
            await self.futures.fail(fut, f"the {fut.op} ran, but the gateway could not record its result "
                                    f"({type(exc).__name__}: {exc}); check the run's checkpoints before retrying",
                                    ErrorCategory.SERVER)
            return
        await self.futures.complete(fut, body, pod_api.CONTENT_PROTOBUF if fut.op in _PROTOBUF else JSON)

    async def seal_gap(self, model_id: str, seq_id: int, reason: str) -> FutureRecord | None:
        """Uses up `seq_id`, which never arrived, with a failed future; None when it has a future after all."""
        model = await self.repo.get_model(model_id)
        if model is None:
            return None
        return await self.futures.refuse(tenant=model.tenant, session_id=model.session_id, target_id=model_id,
                                         seq_id=seq_id, op=FutureOp.GAP, problem=reason)

    async def _translate(self, fut: FutureRecord, result: OpResult) -> bytes:
        meta = fut.meta or {}
        if fut.op in _PROTOBUF:
            if not result.content_type.startswith(pod_api.CONTENT_PROTOBUF):
                raise ValueError(f"expected protobuf, got {result.content_type}")
            return result.body
        if fut.op == FutureOp.CREATE_MODEL:
            return json_bytes({"model_id": fut.target_id, "type": "create_model"})
        if fut.op in (FutureOp.LOAD_WEIGHTS_CREATE, FutureOp.LOAD_STATE):
            return json_bytes({"model_id": fut.target_id, "path": meta.get("path"), "type": "load_weights"})
        if fut.op == FutureOp.OPTIM_STEP:
            return json_bytes({"metrics": pod_api.OptimStepResult.model_validate_json(result.body).metrics})
        saved = pod_api.SaveResult.model_validate_json(result.body)
        if fut.op == FutureOp.SAVE_SAMPLER_WEIGHTS and meta.get("sampler_id"):
            return json_bytes({"sampling_session_id": meta["sampler_id"], "type": "save_weights_for_sampler"})
        if saved.checkpoint is None:
            raise ValueError("no checkpoint in the save result")
        await self.registry.register(fut, saved.checkpoint, meta)
        if fut.op == FutureOp.SAVE_WEIGHTS_EXTERNAL:  # no restore point: a trainer cannot load an export
            return json_bytes({"path": saved.checkpoint.tinker_path, "size_bytes": saved.checkpoint.size_bytes,
                               "type": "save_weights_external"})
        if self.mirror_checkpoint is not None:
            await self.mirror_checkpoint(fut.target_id, saved.checkpoint.tinker_path)
        kind = "save_weights" if fut.op == FutureOp.SAVE_STATE else "save_weights_for_sampler"
        return json_bytes({"path": saved.checkpoint.tinker_path, "type": kind})


_PROTOBUF = (FutureOp.FORWARD_BACKWARD, FutureOp.SAMPLE)


def _failure(body: bytes) -> pod_api.OpFailure:
    try:
        return pod_api.OpFailure.model_validate_json(body)
    except ValidationError:
        try:
            detail = json.loads(body).get("detail", body.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = body.decode(errors="replace")
        return pod_api.OpFailure(error=str(detail)[:4000], category=ErrorCategory.SERVER)
