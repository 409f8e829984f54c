"""The seam between the trainer's runtime (HTTP server, scheduler, ranks) and its compute (engine).

The runtime knows bytes, runs, sequence numbers and ranks; the engine knows models and maths. Rank 0
`prepare`s each op (decode + validate, deterministic, no model state touched) so bad input fails
with a 4xx before anything runs; the scheduler groups prepared ops into passes (at most one op per
run), and every rank `run_pass`es the same pass, except sample passes, which rank 0 runs alone (they
touch no collective) unless the base is sharded over the ranks (then every rank decodes in lockstep).
Attaching and detaching a run are ops too (`PoolOpKind`), so every rank builds and drops a run's
state in step with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from tinkerkube_contract.pod_api import ErrorCategory, OpKind, RunSpec


class OpError(Exception):
    """An op that cannot run. `category` reaches the SDK user unchanged (user: fix your input)."""

    def __init__(self, message: str, *, code: str = "invalid_request", category: ErrorCategory = ErrorCategory.USER):
        super().__init__(message)
        self.message = message
        self.code = code
        self.category = category


class PoolOpKind(StrEnum):
    """Ops on the pool itself rather than on a run's queue."""

    ATTACH = "attach"
    DETACH = "detach"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    base_model: str
    checkpoint_dir: Path
    model_cache_dir: Path
    model_aliases: dict[str, str] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda
    sharding: str = "replicate"  # replicate | fsdp (the frozen base sharded over the ranks, fsdp.py)
    max_runs: int = 8
    max_lora_rank: int = 128
    max_snapshots_per_run: int = 8  # oldest in-memory sampler snapshots of a run are dropped beyond this
    auto_checkpoint_steps: int = 20  # a run's weights + optimizer written every this many optim_steps (0: never)
    auto_checkpoint_seconds: float = 600.0  # ... or after this long since the last one, at its next optim_step
    auto_checkpoints_kept: int = 2  # older automatic checkpoints of a run are deleted
    max_sample_tokens: int = 262_144  # num_samples x max_tokens of one sample request: nothing holds the pool longer
    sampler: str = "hf"  # hf: our decode loop; vllm: a vLLM OpenAI server (see vllm_server.VllmServerConfig)
    vllm: Any = None  # vllm_server.VllmServerConfig when sampler == "vllm"


@dataclass(frozen=True, slots=True)
class PreparedOp:
    """Picklable: rank 0 broadcasts passes of these to the other ranks over the gloo control group."""

    kind: OpKind | PoolOpKind
    payload: Any  # the engine's own decoded, validated form of the request
    model_id: str | None = None  # the run it belongs to (None: the base model, for samples)
    seq_id: int | None = None  # its place in the run's order (run ops)


@dataclass(frozen=True, slots=True)
class OpOutput:
    """What rank 0 stores as the op's result and serves back verbatim."""

    content_type: str  # pod_api.CONTENT_PROTOBUF or CONTENT_JSON
    body: bytes


class Collective(Protocol):
    """The only collectives the engine needs. `LocalCollective` for one rank; the runtime supplies
    the torch.distributed one (gloo on CPU, nccl on GPU)."""

    rank: int
    world_size: int

    def all_reduce_sum_(self, tensors: list[Any]) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...


class LocalCollective:
    rank = 0
    world_size = 1

    def all_reduce_sum_(self, tensors: list[Any]) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class SampleFeed(Protocol):
    """How a sampling pass receives requests (also while it decodes: continuous batching) and hands
    each result back as soon as it is ready. Keys are opaque to the engine."""

    def poll(self) -> list[tuple[Any, PreparedOp]]: ...

    def done(self, key: Any, outcome: OpOutput | OpError) -> None: ...

    def progress(self, key: Any) -> Any:
        """The key's `sample_progress.Progress` (a streaming reader watches it), or None."""
        ...

    def stepped(self) -> None:
        """A decode step was recorded (streaming readers may have new tokens)."""
        ...


class Engine(Protocol):
    config: PoolConfig

    def prepare(self, model_id: str | None, kind: OpKind, body: bytes, content_type: str, *,
                seq_id: int | None = None) -> PreparedOp:
        """Decode + validate for the run `model_id`; raise OpError (category user) on bad input. Must not
        touch state. `seq_id` is the op's place in the run's order; checkpoints record it so a restore
        knows which ops it already contains."""
        ...

    def prepare_attach(self, spec: RunSpec) -> PreparedOp:
        """Validate a run for this pool (base model, rank limit); raise OpError on a mismatch."""
        ...

    def prepare_detach(self, model_id: str) -> PreparedOp: ...

    def run_pass(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        """Run a pass (at most one op per run; forward/backward ops co-batched) on every rank, or a pass
        of samples on rank 0 alone. One outcome per op, in order: a failure of one op is its own
        OpError and never touches another run. Raises only for failures of the whole pass."""
        ...

    def run_samples(self, feed: SampleFeed) -> None:
        """Rank 0 alone: decode every request the feed hands over (joining new ones while decoding),
        answering each through `feed.done`; returns when nothing is running and the feed is empty."""
        ...

    def info(self) -> dict[str, Any]:
        """Pool fields for pod_api.PoolInfo that only the engine knows: tokenizer_dir, vocab_size."""
        ...

    def run_info(self, model_id: str) -> dict[str, Any]:
        """Fields for pod_api.RunInfo that only the engine knows: restored_from, last_completed_seq_id (the
        checkpoint's seq_id when restored from this run's own checkpoint, else 0), base_model, lora, mode."""
        ...
