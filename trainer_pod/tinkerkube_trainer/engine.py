"""The trainer's compute: one resident base model and the runs attached to it, behind engine_api.

Why a pool: a run is its adapter, optimizer and snapshots; the base model is the expensive part and
every run of a base model can share one copy. `prepare` (rank 0 only) decodes and validates, so bad
input fails before any rank moves; `run_pass` runs a pass (at most one op per run) on every rank:
forward/backward ops of several runs as one co-batched forward/backward (`train_pass`), the rest one
by one, each with its own outcome. Adapter parameters stay replicated because every rank applies the
same steps; gradients are summed over ranks (Tinker sums losses over tokens and datums). The base is
replicated too, or, with `sharding: fsdp`, sharded over the ranks (`fsdp.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from tinkerkube_contract.paths import CheckpointKind, InvalidTinkerPath, TinkerPath, parse_tinker_path
from tinkerkube_contract.pod_api import (
    CONTENT_JSON,
    CONTENT_PROTOBUF,
    CheckpointWritten,
    ErrorCategory,
    LoadResult,
    OpKind,
    OptimStepResult,
    RunSpec,
    SampleOp,
    SaveResult,
)
from tinkerkube_contract.resource import LoraSpec, SessionMode
from tinkerkube_trainer import checkpoints, codec, export, fsdp, multilora, train_pass, vision
from tinkerkube_trainer.autosave import AutoSaver, latest_durable
from tinkerkube_trainer.engine_api import (
    Collective,
    OpError,
    OpOutput,
    PoolConfig,
    PoolOpKind,
    PreparedOp,
    SampleFeed,
)
from tinkerkube_trainer.lora import DEFAULT_SEED
from tinkerkube_trainer.model_loading import eos_ids, load_base_model, load_sharded_base_model
from tinkerkube_trainer.op_decode import (
    AttachPayload,
    LoadPayload,
    OpDecoder,
    SavePayload,
    json_output,
    parse_json,
)
from tinkerkube_trainer.optim import LoraOptimizer
from tinkerkube_trainer.runs import LIVE, Run
from tinkerkube_trainer.sample_feed import ListFeed
from tinkerkube_trainer.sampling import SampleJob, decode_stream, sample, wants_prompt_scores
from tinkerkube_trainer.train_pass import FbWork
from tinkerkube_trainer.vllm_sampler import AdapterRef, VllmJob, VllmSampler
from tinkerkube_trainer.vllm_server import Adapters, VllmServer, VllmServerConfig

log = logging.getLogger(__name__)


class PoolEngine:
    def __init__(self, config: PoolConfig, collective: Collective):
        self.config = config
        self.collective = collective
        # fsdp on one rank would shard over nobody: the base is then simply held whole.
        self.sharded = config.sharding == "fsdp" and collective.world_size > 1
        if self.sharded:
            loaded, self.sites = load_sharded_base_model(
                config.base_model, aliases=config.model_aliases, cache_dir=config.model_cache_dir,
                device=config.device, rank=collective.rank, world_size=collective.world_size,
                install=multilora.AdapterSites.install, checkpoint_name=multilora.AdapterSites.checkpoint_name)
        else:
            loaded = load_base_model(config.base_model, aliases=config.model_aliases,
                                     cache_dir=config.model_cache_dir, device=config.device)
            self.sites = multilora.AdapterSites.install(loaded.model)
        self.tokenizer, self.device, self.model_dir = loaded.tokenizer, loaded.device, loaded.model_dir
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.eos_ids = sorted(eos_ids(self.tokenizer, loaded.model))
        self.images = vision.ImageEncoder.load(loaded.model, loaded.model_dir)  # None: a text-only model
        self.decoder = OpDecoder(config, self.vocab_size, self.images)
        self.module = loaded.model
        self.model = train_pass.Model(loaded.model, self.sites.routing, pad_id=self.pad_id,
                                      vocab_size=self.vocab_size, device=self.device, sharded=self.sharded)
        log.info("base model loaded", extra={"sharding": "fsdp" if self.sharded else "replicate",
                                             "rank": collective.rank, "base_param_bytes": fsdp.local_param_bytes(
                                                 self.module)})
        self.runs: dict[str, Run] = {}
        self.autosave = AutoSaver(config.checkpoint_dir, every_steps=config.auto_checkpoint_steps,
                                  every_seconds=config.auto_checkpoint_seconds, keep=config.auto_checkpoints_kept)
        self.vllm = self._start_vllm() if config.sampler == "vllm" and collective.rank == 0 else None
        self._runners: dict[OpKind, Callable[[Run, PreparedOp], OpOutput]] = {
            OpKind.OPTIM_STEP: self._optim_step,
            OpKind.SAVE_STATE: self._save_state,
            OpKind.SAVE_SAMPLER_WEIGHTS: self._save_sampler_weights,
            OpKind.LOAD_STATE: self._load_state,
            OpKind.SAVE_EXTERNAL_WEIGHTS: self._save_external,
        }

    def _start_vllm(self) -> VllmSampler:
        """Rank 0 of a `sampler: vllm` pool: its vLLM server (started now or reached by URL)."""
        cfg: VllmServerConfig = self.config.vllm or VllmServerConfig()
        server = VllmServer(cfg, model_dir=self.model_dir, max_lora_rank=self.config.max_lora_rank)
        return VllmSampler(server, Adapters(server, cfg.adapter_dir, cfg.max_adapters), eos_ids=self.eos_ids)

    # ------------------------------------------------------------------ engine_api

    def info(self) -> dict[str, Any]:
        return {"tokenizer_dir": self.model_dir, "vocab_size": self.vocab_size}

    def run_info(self, model_id: str) -> dict[str, Any]:
        run = self._run(model_id)
        return {"restored_from": run.restored_from, "last_completed_seq_id": run.last_completed_seq_id,
                "base_model": run.spec.base_model, "lora": run.spec.lora.model_dump(mode="json"),
                "mode": run.spec.mode.value, "num_bytes": run.num_bytes()}

    def prepare_attach(self, spec: RunSpec) -> PreparedOp:
        """`spec.resume`: attach from the run's newest durable checkpoint (with its optimizer) when it has one."""
        if spec.base_model != self.config.base_model:
            raise OpError(f"this pool serves {self.config.base_model!r}, not {spec.base_model!r}",
                          code="pool_mismatch")
        if spec.lora.rank > self.config.max_lora_rank:
            raise OpError(f"LoRA rank {spec.lora.rank} exceeds this pool's maximum of {self.config.max_lora_rank}",
                          code="rank_too_large")
        durable = latest_durable(self.config.checkpoint_dir, spec.model_id) if spec.resume else None
        if durable is not None:
            spec = spec.model_copy(update={"restore_from": durable.path, "restore_optimizer": True})
        try:
            self.sites.paths(spec.lora)
            directory = None if not spec.restore_from else \
                parse_tinker_path(spec.restore_from).directory(self.config.checkpoint_dir)
        except ValueError as exc:  # InvalidTinkerPath is a ValueError too
            raise OpError(str(exc), code="invalid_run_spec") from None
        return PreparedOp(PoolOpKind.ATTACH, AttachPayload(spec, directory), spec.model_id)

    def prepare_detach(self, model_id: str) -> PreparedOp:
        return PreparedOp(PoolOpKind.DETACH, None, model_id)

    def prepare(self, model_id: str | None, kind: OpKind, body: bytes, content_type: str, *,
                seq_id: int | None = None) -> PreparedOp:
        """Decode + validate on rank 0; touches no state. `seq_id` (optional) is recorded in checkpoints.
        Samples name their run (or none: the base model) in the body; `model_id` is then ignored."""
        if kind is OpKind.SAMPLE:
            op = parse_json(SampleOp, body)[0]
            run = None if op.model_id is None else self._run(op.model_id)
            return PreparedOp(kind, self.decoder.decode_sample(run, op), op.model_id)
        run = self._run(model_id)
        if not run.training:
            raise OpError(f"this run only samples; {kind.value} needs a training run", code="sample_only")
        try:
            payload = self.decoder.decode(run, kind, body, seq_id)
        except InvalidTinkerPath as exc:
            raise OpError(str(exc), code="invalid_path") from None
        return PreparedOp(kind=kind, payload=payload, model_id=model_id, seq_id=seq_id)

    def run_pass(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        outcomes: list[OpOutput | OpError | None] = [None] * len(ops)
        fb = [i for i, op in enumerate(ops) if op.kind is OpKind.FORWARD_BACKWARD]
        samples = [i for i, op in enumerate(ops) if op.kind is OpKind.SAMPLE]
        if fb:
            for i, outcome in zip(fb, self._forward_backward([ops[i] for i in fb]), strict=True):
                outcomes[i] = outcome
        if samples:
            for i, outcome in zip(samples, self._sample([ops[i] for i in samples]), strict=True):
                outcomes[i] = outcome
        for i, op in enumerate(ops):
            if outcomes[i] is None:
                try:
                    outcomes[i] = self._run_one(op)
                except OpError as exc:
                    outcomes[i] = exc
        return outcomes  # type: ignore[return-value]

    def _run_one(self, op: PreparedOp) -> OpOutput:
        if op.kind is PoolOpKind.ATTACH:
            return self._attach(op.payload)
        if op.kind is PoolOpKind.DETACH:
            self.runs.pop(str(op.model_id), None)
            self.autosave.forget(str(op.model_id))
            return OpOutput(CONTENT_JSON, b"{}")
        runner = self._runners.get(op.kind)  # type: ignore[call-overload]
        if runner is None:
            raise OpError(f"unknown op kind {op.kind!r}", code="unknown_op")
        return runner(self._run(op.model_id), op)

    def _run(self, model_id: str | None) -> Run:
        run = self.runs.get(str(model_id))
        if run is None:
            raise OpError(f"no run {model_id!r} is attached to this pool", code="run_not_found")
        return run

    # ------------------------------------------------------------------ prepare

    # ------------------------------------------------------------------ attach

    def _attach(self, p: AttachPayload) -> OpOutput:
        spec, restore = p.spec, None
        if p.restore_dir is not None:
            with_optimizer = spec.restore_optimizer and spec.mode is SessionMode.TRAIN
            restore = checkpoints.from_rank0(self.collective,
                                             lambda: checkpoints.read_restore(p.restore_dir, with_optimizer))
            meta = {k: v for k, v in restore.meta.items() if k != "lora"}  # its LoRA spec wins (below)
            self.decoder.check_fits(spec.lora, meta, str(spec.restore_from))
            if "lora" in restore.meta:  # the checkpoint's own LoRA spec wins
                spec = spec.model_copy(update={"lora": LoraSpec.model_validate(restore.meta["lora"])})
        training = spec.mode is SessionMode.TRAIN
        weights = None
        if training or restore is not None:
            seed = DEFAULT_SEED if spec.lora.seed is None else spec.lora.seed
            weights = self.sites.new_adapter(spec.lora, seed=seed, device=self.device)
            if not training:
                for t in weights.parameters():
                    t.requires_grad_(False)
        run = Run(spec, weights, LoraOptimizer(weights.parameters()) if training and weights else None,
                  max_snapshots=self.config.max_snapshots_per_run)
        if restore is not None:
            assert weights is not None
            self._apply(weights, restore.adapter, str(spec.restore_from))
            if run.optimizer is not None and restore.optimizer_state is not None:
                run.optimizer.load_state_dict(restore.optimizer_state)
            if restore.meta.get("model_id") == spec.model_id:  # our own checkpoint: crash recovery
                run.last_completed_seq_id = int(restore.meta.get("seq_id") or 0)
            run.restored_from = spec.restore_from
            run.snapshots[str(spec.restore_from)] = LIVE
        self.runs[spec.model_id] = run
        return OpOutput(CONTENT_JSON, json.dumps(self.run_info(spec.model_id)).encode())

    @staticmethod
    def _apply(weights: multilora.LoraWeights, tensors: dict[str, torch.Tensor], label: str) -> None:
        problem = multilora.fit_problem(weights, tensors)
        if problem:
            raise OpError(f"checkpoint {label!r} does not fit this adapter ({problem})", code="checkpoint_mismatch")
        multilora.load_peft_state_dict(weights, tensors)

    # ------------------------------------------------------------------ forward / backward

    def _forward_backward(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        works = [FbWork(self._run(op.model_id).weights, op.payload) for op in ops]  # type: ignore[arg-type]
        try:
            train_pass.run(self.model, self.collective, works)
        except torch.OutOfMemoryError:
            if len(ops) == 1:
                return [OpError("this batch does not fit in the pool's memory; send fewer or shorter datums",
                                code="batch_too_large")]
            return [o for op in ops for o in self._forward_backward([op])]  # alone, only the culprit fails
        outcomes: list[OpOutput | OpError] = []
        for op, work in zip(ops, works, strict=True):
            if work.error is not None:
                outcomes.append(work.error)
                continue
            if work.grads is not None:
                self._run(op.model_id).accumulate(work.grads)
            assert work.output is not None
            outcomes.append(work.output)
        return outcomes

    # ------------------------------------------------------------------ optimizer and checkpoints

    def _optim_step(self, run: Run, op: PreparedOp) -> OpOutput:
        metrics = run.step(op.payload.adam_params)
        if self.autosave.stepped(run.model_id) and self.collective.rank == 0 and op.seq_id is not None:
            assert run.weights is not None and run.optimizer is not None
            self.autosave.save(run.model_id, op.seq_id, multilora.peft_state_dict(run.weights),
                               self.sites.peft_config(run.spec.lora, self.model_dir),
                               self._metadata(run, CheckpointKind.WEIGHTS, op.seq_id), run.optimizer.state_dict())
        return json_output(OptimStepResult(metrics=metrics))

    def _metadata(self, run: Run, kind: CheckpointKind, seq_id: int | None) -> dict[str, Any]:
        return {"model_id": run.model_id, "base_model": self.config.base_model, "kind": kind.value,
                "lora": run.spec.lora.model_dump(mode="json"), "seq_id": seq_id}

    def _write(self, run: Run, path: TinkerPath, seq_id: int | None, with_optimizer: bool) -> CheckpointWritten:
        """Rank 0 writes; every rank learns the outcome (a full disk fails the op on every rank alike)."""
        def write() -> int:
            if run.weights is None:
                return 0
            opt = run.optimizer.state_dict() if (with_optimizer and run.optimizer) else None
            try:
                return checkpoints.write_checkpoint(
                    path.directory(self.config.checkpoint_dir), multilora.peft_state_dict(run.weights),
                    self.sites.peft_config(run.spec.lora, self.model_dir),
                    metadata=self._metadata(run, path.kind, seq_id), optimizer_state=opt)
            except Exception as exc:  # a full or read-only store: torch.save reports it as a RuntimeError
                free = shutil.disk_usage(self.config.checkpoint_dir).free
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise OpError(f"could not write checkpoint {path}: {detail} ({free} bytes free in the checkpoint "
                              "store: is it full or read-only?); nothing was changed",
                              code="checkpoint_write_failed", category=ErrorCategory.SERVER) from None

        size = checkpoints.from_rank0(self.collective, write)
        kind = "weights" if path.kind is CheckpointKind.WEIGHTS else "sampler_weights"
        return CheckpointWritten(tinker_path=str(path), kind=kind, size_bytes=size)

    def _save_state(self, run: Run, op: PreparedOp) -> OpOutput:
        p: SavePayload = op.payload
        assert p.path is not None
        return json_output(SaveResult(checkpoint=self._write(run, p.path, p.seq_id, with_optimizer=True)))

    def _save_sampler_weights(self, run: Run, op: PreparedOp) -> OpOutput:
        p: SavePayload = op.payload
        written = None
        if p.path is not None:
            written = self._write(run, p.path, p.seq_id, with_optimizer=False)
            if self._samples_here:
                run.remember(str(p.path))
        if p.snapshot_id and self._samples_here:
            run.remember(p.snapshot_id)
        return json_output(SaveResult(checkpoint=written, snapshot_id=p.snapshot_id))

    def _save_external(self, run: Run, op: PreparedOp) -> OpOutput:
        def adapter() -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
            # These files leave the service: their config names the base model as users know it.
            return None if run.weights is None else (
                multilora.peft_state_dict(run.weights), self.sites.peft_config(run.spec.lora, self.config.base_model))

        saved = export.save(self.collective, op.payload, adapter, self.config.checkpoint_dir)
        return json_output(SaveResult(checkpoint=saved))

    def _load_state(self, run: Run, op: PreparedOp) -> OpOutput:
        p: LoadPayload = op.payload
        directory = p.path.directory(self.config.checkpoint_dir)
        adapter, opt_state = checkpoints.from_rank0(self.collective, lambda: (
            checkpoints.read_adapter(directory),
            checkpoints.load_optimizer_state(directory) if p.with_optimizer else None))
        assert run.weights is not None
        self._apply(run.weights, adapter, str(p.path))
        run.optimizer = LoraOptimizer(run.weights.parameters())
        if opt_state is not None:
            run.optimizer.load_state_dict(opt_state)
        run.acc = None
        return json_output(LoadResult(path=str(p.path)))

    # ------------------------------------------------------------------ sampling

    @property
    def _samples_here(self) -> bool:
        """Rank 0 samples alone, except on a sharded base, where every rank runs every forward."""
        return self.sharded or self.collective.rank == 0

    def _sample(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        """Rank 0: every request of the pass decoded together; one that cannot run fails alone."""
        feed = ListFeed(ops)
        self.run_samples(feed)
        return feed.outcomes  # type: ignore[return-value]

    def run_samples(self, feed: SampleFeed) -> None:
        def job(key: Any, op: PreparedOp) -> SampleJob | VllmJob:
            run = None if op.model_id is None else self._run(op.model_id)
            weights = None if run is None else run.weights_for(op.payload.snapshot_id)
            if self.vllm is None:
                return SampleJob(op.payload.params, weights, feed.progress(key))
            ref = None if run is None or weights is None else AdapterRef(
                run.model_id, weights, self.sites.peft_config(run.spec.lora, self.model_dir), weights is run.weights)
            params = op.payload.params
            prompt = None  # prompt scores: one prefill of our own model (see vllm_sampler)
            if wants_prompt_scores(params):
                prompt = sample(self.module, replace(params, max_tokens=0), eos_ids=self.eos_ids, device=self.device,
                                routing=self.sites.routing, weights=weights, decode=self._decode)
            return VllmJob(params, ref, prompt)

        def take() -> list[tuple[Any, Any]]:
            jobs = []
            for key, op in feed.poll():
                try:
                    jobs.append((key, job(key, op)))
                except OpError as exc:
                    feed.done(key, exc)
            return jobs

        def done(key: Any, result: codec.SampleResult | OpError) -> None:
            feed.done(key, result if isinstance(result, OpError) else
                      OpOutput(CONTENT_PROTOBUF, codec.encode_sample_response(result)))

        if self.vllm is not None:  # the pool's `sampler: vllm` setting
            self.vllm.serve_stream(take, done)
            return
        decode_stream(self.module, take, done, eos_ids=self.eos_ids, device=self.device, routing=self.sites.routing,
                      decode=self._decode, on_step=feed.stepped)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def build_engine(config: PoolConfig, collective: Collective) -> PoolEngine:
    return PoolEngine(config, collective)
