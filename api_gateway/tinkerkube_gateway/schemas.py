"""Lenient request models for the SDK's JSON bodies.

The SDK's own `tinker.types` requests are `extra="forbid"`; a server parsing with them would reject
(400) fields that a newer SDK adds. These mirror the fields we use and ignore the rest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tinkerkube_contract.pod_api import AdamParams  # one definition, shared with the trainer


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ClientConfigRequest(_Req):
    sdk_version: str | None = None


class CreateSessionRequest(_Req):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionIdRequest(_Req):
    session_id: str


class LoraConfig(_Req):
    rank: int = Field(32, ge=1, le=512)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(_Req):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str = Field(min_length=1)
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelIdRequest(_Req):
    model_id: str


class OptimStepRequest(_Req):
    model_id: str
    seq_id: int = Field(ge=1)
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsRequest(_Req):
    model_id: str
    seq_id: int = Field(ge=1)
    path: str | None = None
    ttl_seconds: int | None = Field(None, ge=0)
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None


class SaveWeightsForSamplerRequest(_Req):
    model_id: str
    seq_id: int = Field(ge=1)
    path: str | None = None
    sampling_session_seq_id: int | None = Field(None, ge=0)
    ttl_seconds: int | None = Field(None, ge=0)
    user_metadata: dict[str, Any] | None = None


class LoadWeightsRequest(_Req):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class CreateSamplingSessionRequest(_Req):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class SampleRequest(_Req):
    """Only what routing needs; the whole JSON goes to the trainer as `SampleOp.request`."""

    sampling_session_id: str | None = None
    seq_id: int | None = None
    num_samples: int = Field(1, ge=1, le=1024)
    prompt: dict[str, Any]
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    base_model: str | None = None
    model_path: str | None = None


class RetrieveFutureRequest(_Req):
    request_id: str
    allow_metadata_only: bool = False


class FinishSessionRequest(_Req):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class TtlRequest(_Req):
    ttl_seconds: int | None = Field(None, ge=0)


class WeightsInfoRequest(_Req):
    tinker_path: str
