"""Lenient request models for the SDK's JSON bodies, with the bounds of `bounds.py`.

The SDK's own `tinker.types` requests are `extra="forbid"`; a server parsing with them would reject
(400) fields that a newer SDK adds. These mirror the fields we use and ignore the rest. Every float must
be finite, every integer is bounded, free-form maps hold only finite numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from tinkerkube_contract.pod_api import (  # one definition, shared with the trainer
    MAX_AGE_RECIPIENTS,
    MAX_PROMPT_ALT_TOKENS_K,
    AdamParams,
)
from tinkerkube_gateway.bounds import MAX_INT32, Count, JsonMap, SampleSeqId, SeqId, TtlSeconds

TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ClientConfigRequest(_Req):
    sdk_version: str | None = None


ProjectId = Annotated[str, Field(min_length=1, max_length=200)]


class CreateSessionRequest(_Req):
    tags: list[str] = Field(default_factory=list)
    user_metadata: JsonMap | None = None
    sdk_version: str | None = None
    project_id: ProjectId | None = None
    display_name: str | None = None


class AssignProjectRequest(_Req):
    project_id: ProjectId


class SearchOwner(_Req):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(None, max_length=10)


class SessionStatusQuery(_Req):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = Field(None, min_length=1)


class SessionSearchCursor(_Req):
    last_created_at: AwareDatetime
    last_session_id: str = Field(max_length=200)


class SessionSearchRequest(_Req):
    """The SDK's SessionSearchRequest (tinker.types), its bounds included."""

    session_id: str | None = Field(None, max_length=200)
    project_ids: list[ProjectId] | None = Field(None, max_length=100)
    user_metadata: dict[str, str] = Field(default_factory=dict, max_length=50)
    display_name: str | None = Field(None, min_length=1, max_length=1000)
    owner: SearchOwner = Field(default_factory=SearchOwner)
    statuses: list[SessionStatusQuery] | None = Field(None, min_length=1, max_length=10)
    limit: int = Field(50, ge=1, le=200)
    cursor: SessionSearchCursor | None = None


class JoinSamplingSessionRequest(_Req):
    sampling_session_id: str = Field(min_length=1, max_length=250)


class SessionIdRequest(_Req):
    session_id: str


class LoraConfig(_Req):
    rank: int = Field(32, ge=1, le=512)
    seed: int | None = Field(None, ge=0, lt=2**63)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(_Req):
    session_id: str
    model_seq_id: Count
    base_model: str = Field(min_length=1)
    user_metadata: JsonMap | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: JsonMap | None = None


class CreateCustomLossRequest(_Req):
    """The SDK's CreateCustomLossRequest; the graph itself is checked by `tinkerkube_contract.custom_loss`."""

    session_id: str = Field(max_length=200)
    custom_loss_seq_id: int = Field(ge=0, le=MAX_INT32)
    name: str = Field(max_length=200)
    inputs: list[Any] = Field(max_length=64)
    graph: dict[str, Any]


class ModelIdRequest(_Req):
    model_id: str


class OptimStepRequest(_Req):
    model_id: str
    seq_id: SeqId
    adam_params: AdamParams | None = None
    optimizer_params: JsonMap | None = None


class SaveWeightsRequest(_Req):
    model_id: str
    seq_id: SeqId
    path: str | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: JsonMap | None = None


# age's own recipient forms (bech32 "age1..." keys) and the SSH public keys age accepts; the trainer parses
# them fully (pyrage) before it writes anything. This only keeps garbage out of the op log.
AGE_RECIPIENT = r"^(age1[02-9ac-hj-np-z]{10,2000}|(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/=]{16,4096}( [^\n]{0,256})?)$"


class SaveWeightsExternalRequest(_Req):
    model_id: str
    seq_id: SeqId
    path: str
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[Annotated[str, Field(pattern=AGE_RECIPIENT)]] | None = Field(
        None, max_length=MAX_AGE_RECIPIENTS)


class SaveWeightsForSamplerRequest(_Req):
    model_id: str
    seq_id: SeqId
    path: str | None = None
    sampling_session_seq_id: Count | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: JsonMap | None = None


class LoadWeightsRequest(_Req):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: Count | None = None
    base_model: str | None = Field(None, min_length=1)
    user_metadata: JsonMap | None = None
    optimizer_config: JsonMap | None = None
    weights_access_token: str | None = Field(None, max_length=4096)


class CopyWeightsRequest(_Req):
    source_path: str
    session_id: str | None = None
    model_seq_id: Count | None = None
    destination_project_id: str | None = Field(None, min_length=1, max_length=200)
    ttl_seconds: TtlSeconds | None = None
    weights_access_token: str | None = Field(None, max_length=4096)


class CreateSamplingSessionRequest(_Req):
    session_id: str
    sampling_session_seq_id: Count
    base_model: str | None = None
    model_path: str | None = None


class SamplingParams(_Req):
    """Checked here because the trainer's loop trusts them: a NaN temperature or an unbounded
    max_tokens would hold its op thread. Generation as a whole is capped per request by the
    `max_sample_tokens` setting (SamplingService)."""

    max_tokens: Count | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(-1, ge=-1, le=MAX_INT32)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | list[TokenId] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # the tinker SDK serialises inf and NaN as null (pydantic's JSON mode)
            raise ValueError("must be a finite number, got null (the tinker SDK sends inf and NaN as null)")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_is_on_or_off(cls, value: int) -> int:
        if value == 0:
            raise ValueError("top_k must be -1 (off) or positive")
        return value


class SampleRequest(_Req):
    """What routing and bounds need; the whole JSON goes to the trainer as `SampleOp.request`."""

    sampling_session_id: str | None = None
    seq_id: SampleSeqId | None = None
    num_samples: int = Field(1, ge=1, le=1024)
    prompt: JsonMap
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    base_model: str | None = None
    model_path: str | None = None
    topk_prompt_logprobs: Count = 0
    topk_sample_logprobs: Count = 0
    prompt_logprobs_last_n: Count | None = None
    prompt_alt_tokens_k: int = Field(0, ge=0, le=MAX_PROMPT_ALT_TOKENS_K)  # cells: SamplingService


class RetrieveFutureRequest(_Req):
    request_id: str
    allow_metadata_only: bool = False


class RequestIdRequest(_Req):
    request_id: str = Field(max_length=200)


class FuturesTarget(_Req):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str = Field(max_length=250)
    cloned_sampler_id: Count = 0


class RetrieveFuturesRequest(_Req):
    target: FuturesTarget
    prev_cursor: int = Field(0, ge=0, lt=2**63)
    timeout: float | None = Field(None, ge=0)
    retrieved_request_ids: list[str] = Field(default_factory=list, max_length=100_000)


class FinishSessionRequest(_Req):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class TtlRequest(_Req):
    ttl_seconds: TtlSeconds | None = None


class WeightsInfoRequest(_Req):
    tinker_path: str
