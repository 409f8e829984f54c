"""The seam between the trainer's runtime (HTTP server, op queue, ranks) and its compute (engine).

The runtime knows bytes, sequence numbers and ranks; the engine knows models and maths. Rank 0
`prepare`s each op (decode + validate, deterministic, no model state touched) so bad input fails
with a 4xx before anything runs, then every rank `execute`s the same prepared op, except samples,
which rank 0 runs alone (they touch no collective).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tinkerkube_contract.pod_api import ErrorCategory, OpKind
from tinkerkube_contract.resource import LoraSpec, SessionMode


class OpError(Exception):
    """An op that cannot run. `category` reaches the SDK user unchanged (user: fix your input)."""

    def __init__(self, message: str, *, code: str = "invalid_request", category: ErrorCategory = ErrorCategory.USER):
        super().__init__(message)
        self.message = message
        self.code = code
        self.category = category


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_id: str
    base_model: str
    mode: SessionMode
    lora: LoraSpec
    checkpoint_dir: Path
    model_cache_dir: Path
    model_aliases: dict[str, str] = field(default_factory=dict)
    restore_from: str | None = None
    restore_optimizer: bool = False
    device: str = "auto"  # auto | cpu | cuda


@dataclass(frozen=True, slots=True)
class PreparedOp:
    """Picklable: rank 0 broadcasts it to the other ranks over the gloo control group."""

    kind: OpKind
    payload: Any  # the engine's own decoded, validated form of the request


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


class Engine(Protocol):
    config: EngineConfig

    def prepare(self, kind: OpKind, body: bytes, content_type: str, *, seq_id: int | None = None) -> PreparedOp:
        """Decode + validate; raise OpError (category user) on bad input. Must not touch state.
        `seq_id` is the op's place in the model's order; checkpoints record it so a restore knows
        which ops it already contains."""
        ...

    def execute(self, op: PreparedOp) -> OpOutput:
        """Run on every rank (SAMPLE: rank 0 only). Raise OpError for failures worth a category."""
        ...

    def info(self) -> dict[str, Any]:
        """Fields for pod_api.TrainerInfo that only the engine knows: tokenizer_dir, vocab_size,
        restored_from, last_completed_seq_id (the checkpoint's seq_id when restored, else 0), and
        base_model/lora when a restored checkpoint's own values replaced the configured ones."""
        ...
