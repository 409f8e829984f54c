"""The trainer's compute: one LoRA model, its optimizer, snapshots and checkpoints, behind engine_api.

Why this split of work: `prepare` (rank 0 only) decodes and validates, so bad input fails before any
rank moves; `execute` runs the same prepared op on every rank. Each rank takes a contiguous shard of
the datums, runs them as one padded forward, and all-reduce-SUMs its gradients: Tinker sums losses
over tokens and datums, so the sum over ranks is the one-rank gradient. Gradients of each call are
summed into a separate accumulator, so earlier calls are never all-reduced twice and `forward`
leaves everything untouched. Parameters stay replicated because every rank applies the same step.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from tinkerkube_contract.paths import CheckpointKind, InvalidTinkerPath, TinkerPath, parse_tinker_path, validate_name
from tinkerkube_contract.pod_api import (
    CONTENT_JSON,
    CONTENT_PROTOBUF,
    CheckpointWritten,
    LoadResult,
    LoadStateOp,
    OpKind,
    OptimStepOp,
    OptimStepResult,
    SampleOp,
    SaveResult,
    SaveSamplerWeightsOp,
    SaveStateOp,
)
from tinkerkube_contract.resource import LoraSpec, SessionMode
from tinkerkube_trainer import checkpoints, codec
from tinkerkube_trainer.batching import Batch, collate, micro_batches, shard_bounds
from tinkerkube_trainer.engine_api import Collective, EngineConfig, OpError, OpOutput, PreparedOp
from tinkerkube_trainer.lora import attach_adapter, lora_parameters
from tinkerkube_trainer.losses import LOSSES, REQUIRED_INPUTS, LossConfig, LossInputs, canonical_loss_name, reduce_sum
from tinkerkube_trainer.losses import parse_config as parse_loss_config
from tinkerkube_trainer.model_loading import load_base_model
from tinkerkube_trainer.optim import LoraOptimizer
from tinkerkube_trainer.sampling import sample

M = TypeVar("M", bound=BaseModel)
MAX_LOGITS_PER_FORWARD = 2**28  # fp32 logits per micro-batch (1 GiB): one forward unless memory demands more
MAX_SNAPSHOTS = 32  # oldest in-memory snapshots are dropped beyond this
_FLOAT_FIELDS = {"weights": "weights", "logprobs": "sampling_logprobs", "advantages": "advantages",
                 "clip_low_threshold": "clip_low", "clip_high_threshold": "clip_high",
                 "sequence_ratio_mask": "sequence_ratio_mask"}


@dataclass(frozen=True, slots=True)
class FbPayload:
    request: codec.ForwardBackwardPayload
    loss: str
    cfg: LossConfig


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


def _json(model: BaseModel) -> OpOutput:
    return OpOutput(CONTENT_JSON, model.model_dump_json().encode())


def _parse_json(cls: type[M], body: bytes) -> tuple[M, dict[str, Any]]:
    try:
        raw = json.loads(body or b"{}")
        return cls.model_validate(raw), raw if isinstance(raw, dict) else {}
    except (ValueError, ValidationError) as exc:
        raise OpError(f"invalid {cls.__name__} body: {exc}", code="invalid_request") from None


class TrainingEngine:
    def __init__(self, config: EngineConfig, collective: Collective, *, base_model: str, lora: LoraSpec,
                 restore: checkpoints.Restored | None = None):
        self.config = config
        self.collective = collective
        self.base_model, self.lora = base_model, lora
        loaded = load_base_model(base_model, aliases=config.model_aliases, cache_dir=config.model_cache_dir,
                                 device=config.device)
        self.tokenizer, self.device, self.model_dir = loaded.tokenizer, loaded.device, loaded.model_dir
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.eos_ids = sorted(self._eos_ids(loaded.model))
        self.mode = SessionMode(config.mode)
        training = self.mode is SessionMode.TRAIN
        self.model = attach_adapter(loaded.model, lora) if (training or restore) else loaded.model
        self.params = [p for _, p in lora_parameters(self.model)]
        self.optimizer = LoraOptimizer(self.params) if training else None
        self._acc: list[torch.Tensor] | None = None  # summed gradients since the last optim_step
        self._snapshots: OrderedDict[str, checkpoints.Snapshot | None] = OrderedDict()
        self.restored_from = config.restore_from
        self.last_completed_seq_id = 0
        if restore is not None:
            checkpoints.apply_adapter(self.model, restore.adapter, str(config.restore_from))  # type: ignore[arg-type]
            if self.optimizer is not None and restore.optimizer_state is not None:
                self.optimizer.load_state_dict(restore.optimizer_state)
            if restore.meta.get("model_id") == config.model_id:  # our own checkpoint: crash recovery
                self.last_completed_seq_id = int(restore.meta.get("seq_id") or 0)
            self._snapshots[str(config.restore_from)] = None  # "the weights served now"
        self._runners: dict[OpKind, Callable[[Any], OpOutput]] = {
            OpKind.FORWARD_BACKWARD: self._forward_backward,
            OpKind.OPTIM_STEP: self._optim_step,
            OpKind.SAVE_STATE: self._save_state,
            OpKind.SAVE_SAMPLER_WEIGHTS: self._save_sampler_weights,
            OpKind.LOAD_STATE: self._load_state,
            OpKind.SAMPLE: self._sample,
        }

    def _eos_ids(self, model: torch.nn.Module) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids |= set(gen_eos) if isinstance(gen_eos, list) else ({gen_eos} if gen_eos is not None else set())
        return {int(i) for i in ids}

    # ------------------------------------------------------------------ engine_api

    def info(self) -> dict[str, Any]:
        return {"tokenizer_dir": self.model_dir, "vocab_size": self.vocab_size,
                "restored_from": self.restored_from, "last_completed_seq_id": self.last_completed_seq_id}

    def prepare(self, kind: OpKind, body: bytes, content_type: str, *, seq_id: int | None = None) -> PreparedOp:
        """Decode + validate on rank 0; touches no state. `seq_id` (optional) is recorded in checkpoints."""
        if self.mode is SessionMode.SAMPLE and kind is not OpKind.SAMPLE:
            raise OpError(f"this trainer only samples; {kind.value} needs a training session", code="sample_only")
        try:
            payload = self._decode(kind, body, seq_id)
        except InvalidTinkerPath as exc:
            raise OpError(str(exc), code="invalid_path") from None
        return PreparedOp(kind=kind, payload=payload)

    def execute(self, op: PreparedOp) -> OpOutput:
        runner = self._runners.get(op.kind)
        if runner is None:
            raise OpError(f"unknown op kind {op.kind!r}", code="unknown_op")
        return runner(op.payload)

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable adapter tensors by parameter name (diagnostics and tests)."""
        return {n: p.detach().clone() for n, p in lora_parameters(self.model)}

    def accumulated_grads(self) -> dict[str, torch.Tensor]:
        """Copies of the gradients summed since the last optim_step (empty when there are none)."""
        names = [n for n, _ in lora_parameters(self.model)]
        return {} if self._acc is None else {n: g.clone() for n, g in zip(names, self._acc, strict=True)}

    # ------------------------------------------------------------------ prepare

    def _decode(self, kind: OpKind, body: bytes, seq_id: int | None) -> Any:
        if kind is OpKind.FORWARD_BACKWARD:
            request = codec.decode_forward_backward(body)
            loss = canonical_loss_name(request.loss_fn)
            codec.validate_forward_backward(request, REQUIRED_INPUTS[loss], self.vocab_size,
                                            allow_topk=loss == "cross_entropy")
            return FbPayload(request, loss, parse_loss_config(request.config, request.legacy_config))
        if kind is OpKind.OPTIM_STEP:
            return _parse_json(OptimStepOp, body)[0]
        if kind is OpKind.SAVE_STATE:
            op, raw = _parse_json(SaveStateOp, body)
            path = TinkerPath(self.config.model_id, CheckpointKind.WEIGHTS, validate_name(op.name))
            return SavePayload(path, None, seq_id if seq_id is not None else raw.get("seq_id"))
        if kind is OpKind.SAVE_SAMPLER_WEIGHTS:
            sop, raw = _parse_json(SaveSamplerWeightsOp, body)
            if sop.name is None and not sop.snapshot_id:
                raise OpError("save_sampler_weights needs a name or a snapshot_id", code="invalid_request")
            path = None if sop.name is None else TinkerPath(
                self.config.model_id, CheckpointKind.SAMPLER_WEIGHTS, validate_name(sop.name))
            return SavePayload(path, sop.snapshot_id, seq_id if seq_id is not None else raw.get("seq_id"))
        if kind is OpKind.LOAD_STATE:
            return self._decode_load(_parse_json(LoadStateOp, body)[0])
        if kind is OpKind.SAMPLE:
            return self._decode_sample(_parse_json(SampleOp, body)[0])
        raise OpError(f"unknown op kind {kind!r}", code="unknown_op")

    def _decode_load(self, op: LoadStateOp) -> LoadPayload:
        path = parse_tinker_path(op.path)
        if path.kind not in (CheckpointKind.WEIGHTS, CheckpointKind.SAMPLER_WEIGHTS):
            raise OpError(f"cannot load {path.kind.value} checkpoints", code="invalid_path")
        directory = path.directory(self.config.checkpoint_dir)
        meta = checkpoints.read_metadata(directory)
        if meta.get("base_model", self.base_model) != self.base_model:
            raise OpError(f"{op.path} was trained on {meta['base_model']!r}, this model is {self.base_model!r}",
                          code="checkpoint_mismatch")
        if "lora" in meta and LoraSpec.model_validate(meta["lora"]).rank != self.lora.rank:
            raise OpError(f"{op.path} has LoRA rank {meta['lora'].get('rank')}, this model {self.lora.rank}",
                          code="checkpoint_mismatch")
        if op.with_optimizer and not meta.get("has_optimizer", False):
            raise OpError(f"{op.path} holds no optimizer state; load it without the optimizer",
                          code="no_optimizer_state")
        return LoadPayload(path, op.with_optimizer)

    def _decode_sample(self, op: SampleOp) -> SamplePayload:
        params = codec.decode_sample_request(op.request)
        if max(params.prompt) >= self.vocab_size or min(params.prompt) < 0:
            raise OpError(f"prompt has token ids outside [0, {self.vocab_size})", code="token_out_of_range")
        if params.target_prompt_ids is not None and params.target_prompt_ids.size and \
                params.target_prompt_ids.max() >= self.vocab_size:
            raise OpError(f"target_prompt_logprobs ids must be below {self.vocab_size}", code="token_out_of_range")
        if any(t < 0 or t >= self.vocab_size for t in params.stop_tokens or ()):
            raise OpError(f"stop token ids must be in [0, {self.vocab_size})", code="token_out_of_range")
        if op.snapshot_id is not None and op.snapshot_id not in self._snapshots:
            raise OpError(f"unknown sampler snapshot {op.snapshot_id!r}: save weights for the sampler first",
                          code="unknown_snapshot")
        return SamplePayload(params, op.snapshot_id)

    # ------------------------------------------------------------------ forward / backward

    def _token_logprobs(self, batch: Batch) -> torch.Tensor:
        # No padding (equal lengths): no mask, so attention can take its plain causal fast path.
        mask = None if min(batch.lengths) == max(batch.lengths) else batch.attention_mask
        logits = self.model(input_ids=batch.input_ids, attention_mask=mask).logits.float()
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        if batch.targets.dim() == 3:  # (B, T, K) top-K targets: logprobs per slot
            return logits.gather(-1, batch.targets) - norm
        return (logits.gather(-1, batch.targets.unsqueeze(-1)) - norm).squeeze(-1)

    def _run_micro_batch(self, p: FbPayload, chunk: Sequence[codec.DatumData], train: bool):
        batch = collate(chunk, self.pad_id).to(self.device)
        with torch.set_grad_enabled(train):
            lp = self._token_logprobs(batch)
            inputs = {_FLOAT_FIELDS[k]: v for k, v in batch.float_inputs.items()}
            per_token = LOSSES[p.loss](LossInputs(target_logprobs=lp, mask=batch.mask, **inputs), p.cfg)
            loss = reduce_sum(per_token)
            if train:
                loss.backward()
        lp_np, loss_np = lp.detach().float().cpu().numpy(), per_token.detach().float().cpu().numpy()
        outs = [{"logprobs": lp_np[i, :n], "elementwise_loss": loss_np[i, :n]} for i, n in enumerate(batch.lengths)]
        return outs, loss.detach()

    def _forward_backward(self, p: FbPayload) -> OpOutput:
        datums = p.request.datums
        start, end = shard_bounds(len(datums), self.collective.rank, self.collective.world_size)
        train = not p.request.forward_only
        if train and self.optimizer is None:
            raise OpError("this trainer has no optimizer (sample mode)", code="sample_only")
        for param in self.params:
            param.grad = None
        outputs: list[dict[str, np.ndarray]] = []
        total = torch.zeros((), device=self.device)
        for chunk in micro_batches(datums[start:end], MAX_LOGITS_PER_FORWARD // self.vocab_size):
            outs, loss = self._run_micro_batch(p, chunk, train)
            outputs.extend(outs)
            total = total + loss
        if train:
            self._accumulate_grads()
        gathered = self.collective.all_gather_object((outputs, float(total)))
        if self.collective.rank != 0:
            return OpOutput(CONTENT_PROTOBUF, b"")
        merged = [o for outs, _ in gathered for o in outs]
        metrics = {"loss:sum": sum(loss for _, loss in gathered), "num_tokens:sum": float(sum(
            len(d.tokens) for d in datums))}
        return OpOutput(CONTENT_PROTOBUF, codec.encode_forward_backward_output(merged, metrics))

    def _accumulate_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.collective.all_reduce_sum_(grads)  # Tinker sums over datums: SUM across ranks, never average
        if self._acc is None:
            self._acc = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
        for acc, g in zip(self._acc, grads, strict=True):
            acc.add_(g)
        for param in self.params:
            param.grad = None

    # ------------------------------------------------------------------ optimizer and checkpoints

    def _optim_step(self, op: OptimStepOp) -> OpOutput:
        assert self.optimizer is not None  # prepare() refuses training ops in sample mode
        for param, acc in zip(self.params, self._acc or [None] * len(self.params), strict=True):
            param.grad = None if acc is None else acc.to(param.dtype)
        self._acc = None
        return _json(OptimStepResult(metrics=self.optimizer.step(op.adam_params)))

    def _metadata(self, kind: CheckpointKind, seq_id: int | None) -> dict[str, Any]:
        return {"model_id": self.config.model_id, "base_model": self.base_model, "kind": kind.value,
                "lora": self.lora.model_dump(mode="json"), "seq_id": seq_id}

    def _write(self, path: TinkerPath, seq_id: int | None, with_optimizer: bool) -> CheckpointWritten:
        size = 0
        if self.collective.rank == 0:
            opt = self.optimizer.state_dict() if (with_optimizer and self.optimizer) else None
            size = checkpoints.write_checkpoint(path.directory(self.config.checkpoint_dir), self.model,  # type: ignore[arg-type]
                                                metadata=self._metadata(path.kind, seq_id), optimizer_state=opt)
        kind = "weights" if path.kind is CheckpointKind.WEIGHTS else "sampler_weights"
        return CheckpointWritten(tinker_path=str(path), kind=kind, size_bytes=size)

    def _save_state(self, p: SavePayload) -> OpOutput:
        assert p.path is not None
        return _json(SaveResult(checkpoint=self._write(p.path, p.seq_id, with_optimizer=True)))

    def _remember(self, snapshot_id: str) -> None:
        if self.collective.rank == 0:  # only rank 0 samples
            self._snapshots[snapshot_id] = checkpoints.take_snapshot(self.model)
            self._snapshots.move_to_end(snapshot_id)
            while len(self._snapshots) > MAX_SNAPSHOTS:
                self._snapshots.popitem(last=False)

    def _save_sampler_weights(self, p: SavePayload) -> OpOutput:
        written = None
        if p.path is not None:
            written = self._write(p.path, p.seq_id, with_optimizer=False)
            self._remember(str(p.path))
        if p.snapshot_id:
            self._remember(p.snapshot_id)
        return _json(SaveResult(checkpoint=written, snapshot_id=p.snapshot_id))

    def _load_state(self, p: LoadPayload) -> OpOutput:
        directory = p.path.directory(self.config.checkpoint_dir)
        adapter, opt_state = checkpoints.from_rank0(self.collective, lambda: (
            checkpoints.read_adapter(directory),
            checkpoints.load_optimizer_state(directory) if p.with_optimizer else None))
        checkpoints.apply_adapter(self.model, adapter, str(p.path))  # type: ignore[arg-type]
        self.optimizer = LoraOptimizer(self.params)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        self._acc = None
        return _json(LoadResult(path=str(p.path)))

    # ------------------------------------------------------------------ sampling

    def _sample(self, p: SamplePayload) -> OpOutput:
        if p.snapshot_id is not None and p.snapshot_id not in self._snapshots:
            raise OpError(f"sampler snapshot {p.snapshot_id!r} is no longer held", code="unknown_snapshot")
        snapshot = None if p.snapshot_id is None else self._snapshots[p.snapshot_id]
        with checkpoints.swapped_weights(self.model, snapshot):
            result = sample(self.model, p.params, eos_ids=self.eos_ids, device=self.device,
                            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        return OpOutput(CONTENT_PROTOBUF, codec.encode_sample_response(result))


def build_engine(config: EngineConfig, collective: Collective) -> TrainingEngine:
    """Load the base model (+ adapter); with `restore_from`, the checkpoint's base model and LoRA spec win."""
    base_model, lora, restore = config.base_model, config.lora, None
    if config.restore_from:
        try:
            directory = parse_tinker_path(config.restore_from).directory(config.checkpoint_dir)
        except InvalidTinkerPath as exc:
            raise OpError(str(exc), code="invalid_path") from None
        with_optimizer = config.restore_optimizer and SessionMode(config.mode) is SessionMode.TRAIN
        restore = checkpoints.from_rank0(collective, lambda: checkpoints.read_restore(directory, with_optimizer))
        base_model = restore.meta.get("base_model") or base_model
        lora = LoraSpec.model_validate(restore.meta["lora"]) if "lora" in restore.meta else lora
    return TrainingEngine(config, collective, base_model=base_model, lora=lora, restore=restore)
