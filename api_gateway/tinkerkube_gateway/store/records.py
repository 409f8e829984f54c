"""Typed rows: what the store hands to services (frozen dataclasses, never raw dicts, closed sets as
StrEnums: the columns hold their values)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from tinkerkube_contract.paths import CheckpointKind
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import SessionMode


class FutureOp(StrEnum):
    """What a future stands for: an op the trainer runs (the values of `pod_api.OpKind`), or one only
    the gateway knows."""

    FORWARD_BACKWARD = OpKind.FORWARD_BACKWARD.value
    OPTIM_STEP = OpKind.OPTIM_STEP.value
    SAVE_STATE = OpKind.SAVE_STATE.value
    SAVE_SAMPLER_WEIGHTS = OpKind.SAVE_SAMPLER_WEIGHTS.value
    LOAD_STATE = OpKind.LOAD_STATE.value
    SAVE_WEIGHTS_EXTERNAL = OpKind.SAVE_EXTERNAL_WEIGHTS.value
    SAMPLE = OpKind.SAMPLE.value
    CREATE_MODEL = "create_model"  # completes when the run's trainer is ready (seq_id 0)
    LOAD_WEIGHTS_CREATE = "load_weights_create"  # create_model from a checkpoint
    START_SAMPLER = "start_sampler"  # a sampler process group is ready
    CREATE_CUSTOM_LOSS = "create_custom_loss"  # a validated custom loss stored (the gateway alone)
    UNKNOWN = "unknown"  # a refused request to a route this gateway does not have
    GAP = "gap"  # a seq_id that never arrived, sealed after the gap timeout


CREATE_OPS = frozenset({FutureOp.CREATE_MODEL, FutureOp.LOAD_WEIGHTS_CREATE, FutureOp.START_SAMPLER})


class FutureState(StrEnum):
    PENDING = "pending"
    COMPLETE = "complete"
    FAILED = "failed"


class SessionStatus(StrEnum):
    ACTIVE = "active"
    FINISHED = "finished"
    REAPED = "reaped"


class ModelStatus(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPED = "stopped"
    FAILED = "failed"


LIVE = (ModelStatus.STARTING, ModelStatus.READY)  # a run whose trainer is (being) started


def _from_row(cls: type, row: Any, enums: Mapping[str, type[StrEnum]]) -> Any:
    mapping = row._mapping
    values = {f.name: mapping[f.name] for f in fields(cls)}
    for name, enum in enums.items():
        if values[name] is not None:
            values[name] = enum(values[name])
    return cls(**values)


@dataclass(frozen=True, slots=True)
class FutureRecord:
    request_id: str
    tenant: str
    session_id: str | None
    target_id: str
    seq_id: int | None
    trainer_seq: int | None
    op: FutureOp
    state: FutureState
    body: bytes | None
    body_type: str | None
    meta: dict[str, Any] | None
    result: bytes | None
    result_type: str | None
    error: str | None
    category: str | None
    created_at: float
    completed_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> FutureRecord:
        return _from_row(cls, row, {"op": FutureOp, "state": FutureState})

    @property
    def rejected(self) -> str | None:
        """Why the gateway refused this op (its seq_id is used, nothing ran), None for a real op."""
        return (self.meta or {}).get("rejected")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    tenant: str
    status: SessionStatus
    created_at: float
    last_heartbeat: float
    user_metadata: dict[str, Any] | None
    tags: list[str] | None
    display_name: str | None
    ended_reason: str | None

    @classmethod
    def from_row(cls, row: Any) -> SessionRecord:
        return _from_row(cls, row, {"status": SessionStatus})


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: str
    session_id: str
    tenant: str
    kind: SessionMode
    base_model: str
    lora: dict[str, Any] | None
    user_metadata: dict[str, Any] | None
    optimizer_config: dict[str, Any] | None
    restore_from: str | None
    weights_key: str | None
    status: ModelStatus
    error: str | None
    created_at: float
    last_request_time: float

    @classmethod
    def from_row(cls, row: Any) -> ModelRecord:
        return _from_row(cls, row, {"kind": SessionMode, "status": ModelStatus})


@dataclass(frozen=True, slots=True)
class SamplerRecord:
    sampler_id: str
    session_id: str
    tenant: str
    base_model: str
    model_path: str | None
    backing_model_id: str
    snapshot_id: str | None
    created_at: float

    @classmethod
    def from_row(cls, row: Any) -> SamplerRecord:
        return _from_row(cls, row, {})


@dataclass(frozen=True, slots=True)
class CustomLossRecord:
    loss_id: str
    tenant: str
    session_id: str
    name: str
    spec: bytes  # the request's {name, inputs, graph}, as validated
    created_at: float

    @classmethod
    def from_row(cls, row: Any) -> CustomLossRecord:
        return _from_row(cls, row, {})


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    tinker_path: str
    run_id: str
    tenant: str
    kind: CheckpointKind
    name: str
    size_bytes: int | None
    public: bool
    created_at: float
    expires_at: float | None
    user_metadata: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Any) -> CheckpointRecord:
        return _from_row(cls, row, {"kind": CheckpointKind})
