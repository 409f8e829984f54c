"""Typed rows: what the store hands to services (frozen dataclasses, never raw dicts)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any


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


def _from_row(cls: type, row: Any) -> Any:
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class FutureRecord:
    request_id: str
    tenant: str
    session_id: str | None
    target_id: str
    seq_id: int | None
    trainer_seq: int | None
    op: str
    state: str
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
        return _from_row(cls, row)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    tenant: str
    status: str
    created_at: float
    last_heartbeat: float
    user_metadata: dict[str, Any] | None
    tags: list[str] | None
    display_name: str | None
    ended_reason: str | None

    @classmethod
    def from_row(cls, row: Any) -> SessionRecord:
        return _from_row(cls, row)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: str
    session_id: str
    tenant: str
    kind: str
    base_model: str
    lora: dict[str, Any] | None
    user_metadata: dict[str, Any] | None
    optimizer_config: dict[str, Any] | None
    restore_from: str | None
    weights_key: str | None
    status: str
    error: str | None
    created_at: float
    last_request_time: float

    @classmethod
    def from_row(cls, row: Any) -> ModelRecord:
        return _from_row(cls, row)


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
        return _from_row(cls, row)


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    tinker_path: str
    run_id: str
    tenant: str
    kind: str
    name: str
    size_bytes: int | None
    public: bool
    created_at: float
    expires_at: float | None
    user_metadata: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Any) -> CheckpointRecord:
        return _from_row(cls, row)
