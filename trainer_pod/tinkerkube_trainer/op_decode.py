"""Rank 0's decoding and validation of a run's requests into the engine's payloads (nothing is run).

Deterministic and free of model state beyond what a request names (a run's spec, its snapshots, a
checkpoint's metadata), so a request that cannot run fails with a 4xx before any rank moves.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from tinkerkube_contract import custom_loss
from tinkerkube_contract.paths import CheckpointKind, TinkerPath, parse_tinker_path, validate_name
from tinkerkube_contract.pod_api import (
    CONTENT_JSON,
    LoadStateOp,
    OpKind,
    OptimStepOp,
    RunSpec,
    SampleOp,
    SaveExternalWeightsOp,
    SaveSamplerWeightsOp,
    SaveStateOp,
)
from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer import checkpoints, codec, custom_loss_run, export
from tinkerkube_trainer.engine_api import OpError, OpOutput, PoolConfig
from tinkerkube_trainer.losses import REQUIRED_INPUTS, LossConfig, canonical_loss_name
from tinkerkube_trainer.losses import parse_config as parse_loss_config
from tinkerkube_trainer.runs import Run
from tinkerkube_trainer.train_pass import FbPayload

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class SavePayload:
    path: TinkerPath | None  # None: in-memory snapshot only
    snapshot_id: str | None
    seq_id: int | None


@dataclass(frozen=True, slots=True)
class LoadPayload:
    path: TinkerPath
    with_optimizer: bool


@dataclass(frozen=True, slots=True)
class SamplePayload:
    params: codec.SampleParams
    snapshot_id: str | None


@dataclass(frozen=True, slots=True)
class AttachPayload:
    spec: RunSpec
    restore_dir: Path | None


def json_output(model: BaseModel) -> OpOutput:
    return OpOutput(CONTENT_JSON, model.model_dump_json().encode())


def parse_json(cls: type[M], body: bytes) -> tuple[M, dict[str, Any]]:
    try:
        raw = json.loads(body or b"{}")
        return cls.model_validate(raw), raw if isinstance(raw, dict) else {}
    except (ValueError, ValidationError) as exc:
        raise OpError(f"invalid {cls.__name__} body: {exc}", code="invalid_request") from None


class OpDecoder:
    def __init__(self, config: PoolConfig, vocab_size: int, images: codec.Images | None = None) -> None:
        self.config, self.vocab_size, self.images = config, vocab_size, images

    def decode(self, run: Run, kind: OpKind, body: bytes, seq_id: int | None) -> Any:
        if kind is OpKind.FORWARD_BACKWARD:
            request = codec.decode_forward_backward(body, self.images)
            if request.loss_fn == custom_loss.CUSTOM_LOSS_FN:
                return self.decode_custom(request)
            loss = canonical_loss_name(request.loss_fn)
            codec.validate_forward_backward(request, REQUIRED_INPUTS[loss], self.vocab_size,
                                            allow_topk=loss == "cross_entropy")
            return FbPayload(request, loss, parse_loss_config(request.config, request.legacy_config))
        if kind is OpKind.OPTIM_STEP:
            return parse_json(OptimStepOp, body)[0]
        if kind is OpKind.SAVE_STATE:
            op, raw = parse_json(SaveStateOp, body)
            path = TinkerPath(run.model_id, CheckpointKind.WEIGHTS, validate_name(op.name))
            return SavePayload(path, None, seq_id if seq_id is not None else raw.get("seq_id"))
        if kind is OpKind.SAVE_SAMPLER_WEIGHTS:
            sop, raw = parse_json(SaveSamplerWeightsOp, body)
            if sop.name is None and not sop.snapshot_id:
                raise OpError("save_sampler_weights needs a name or a snapshot_id", code="invalid_request")
            path = None if sop.name is None else TinkerPath(
                run.model_id, CheckpointKind.SAMPLER_WEIGHTS, validate_name(sop.name))
            return SavePayload(path, sop.snapshot_id, seq_id if seq_id is not None else raw.get("seq_id"))
        if kind is OpKind.LOAD_STATE:
            return self.decode_load(run, parse_json(LoadStateOp, body)[0])
        if kind is OpKind.SAVE_EXTERNAL_WEIGHTS:
            return export.decode(run.model_id, parse_json(SaveExternalWeightsOp, body)[0])
        raise OpError(f"unknown op kind {kind!r}", code="unknown_op")

    def decode_custom(self, request: codec.ForwardBackwardPayload) -> FbPayload:
        """A stored custom loss (the gateway put its graph in the config): the batch is collated with
        target_tokens alone, the loss's own inputs travel beside it (`CustomPayload`)."""
        text = request.config.get(custom_loss.SPEC_CONFIG_KEY)
        if not isinstance(text, str):
            raise OpError("loss_fn 'custom' runs a loss created with create_custom_loss; this request names none",
                          code="unknown_custom_loss")
        spec = custom_loss_run.parse_spec(text)
        stripped = tuple(dataclasses.replace(d, inputs={k: v for k, v in d.inputs.items() if k == "target_tokens"})
                         for d in request.datums)
        collated = dataclasses.replace(request, datums=stripped)
        codec.validate_forward_backward(collated, ("target_tokens",), self.vocab_size, allow_topk=True)
        for i, d in enumerate(request.datums):
            for name in spec.input_names:
                arr = d.inputs.get(name)
                if arr is not None and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                    raise OpError(f"datum {i}: loss_fn_inputs[{name!r}] contains NaN or infinity", code="bad_value")
        custom = custom_loss_run.prepare(spec, request.datums)
        return FbPayload(collated, custom_loss.CUSTOM_LOSS_FN, LossConfig(), custom)

    def decode_load(self, run: Run, op: LoadStateOp) -> LoadPayload:
        path = parse_tinker_path(op.path)
        if path.kind not in (CheckpointKind.WEIGHTS, CheckpointKind.SAMPLER_WEIGHTS):
            raise OpError(f"cannot load {path.kind.value} checkpoints", code="invalid_path")
        meta = checkpoints.read_metadata(path.directory(self.config.checkpoint_dir))
        self.check_fits(run.spec.lora, meta, op.path)
        if op.with_optimizer and not meta.get("has_optimizer", False):
            raise OpError(f"{op.path} holds no optimizer state; load it without the optimizer",
                          code="no_optimizer_state")
        return LoadPayload(path, op.with_optimizer)

    def check_fits(self, lora: LoraSpec, meta: dict[str, Any], label: str) -> None:
        if meta.get("base_model", self.config.base_model) != self.config.base_model:
            raise OpError(f"{label} was trained on {meta['base_model']!r}, this model is {self.config.base_model!r}",
                          code="checkpoint_mismatch")
        if "lora" in meta and LoraSpec.model_validate(meta["lora"]).rank != lora.rank:
            raise OpError(f"{label} has LoRA rank {meta['lora'].get('rank')}, this model {lora.rank}",
                          code="checkpoint_mismatch")

    def decode_sample(self, run: Run | None, op: SampleOp) -> SamplePayload:
        params = codec.decode_sample_request(op.request, self.images)
        asked = params.num_samples * params.max_tokens
        if asked > self.config.max_sample_tokens:
            raise OpError(f"num_samples x max_tokens = {asked} exceeds this pool's cap of "
                          f"{self.config.max_sample_tokens} tokens per request", code="too_many_tokens")
        if max(params.prompt) >= self.vocab_size or min(params.prompt) < 0:
            raise OpError(f"prompt has token ids outside [0, {self.vocab_size})", code="token_out_of_range")
        if params.target_prompt_ids is not None and params.target_prompt_ids.size and \
                params.target_prompt_ids.max() >= self.vocab_size:
            raise OpError(f"target_prompt_logprobs ids must be below {self.vocab_size}", code="token_out_of_range")
        if any(t < 0 or t >= self.vocab_size for t in params.stop_tokens or ()):
            raise OpError(f"stop token ids must be in [0, {self.vocab_size})", code="token_out_of_range")
        if op.snapshot_id is not None and (run is None or op.snapshot_id not in run.snapshots):
            raise OpError(f"unknown sampler snapshot {op.snapshot_id!r}: save weights for the sampler first",
                          code="unknown_snapshot")
        return SamplePayload(params, op.snapshot_id)
