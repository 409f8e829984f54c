"""The gateway↔trainer internal HTTP API, version 1: paths, headers and the JSON op/result shapes.

Why our own API instead of proxying Tinker: the trainer must stay ignorant of sessions, tenants and
futures. A trainer is a pool: one resident base model and the runs attached to it, each with a
strictly ordered queue of ops keyed by `(model_id, seq_id)`.

Wire rules
- `PUT run_path(model_id)` (`RunSpec` JSON) attaches a run; `GET` long-polls its `RunInfo` until it is
  ready (`?wait=`); `DELETE` detaches it (its pending ops fail). A full pool answers 429 `pool_full`.
- `PUT  op_path(model_id, seq_id)` submits an op; the header `X-Tinkerkube-Op` names its `OpKind`.
  forward_backward bodies are the SDK's own protobuf `tinker_public.ForwardBackwardRequest` bytes
  (`application/x-protobuf`, image chunks inside as raw bytes): tensors never travel as JSON float
  lists, images never as base64. Every other op body is the
  JSON of its model below. Re-submitting the same op for the same key is a no-op (200, same state);
  a different op under a used key is a 400 `seq_id_reused`. Ops run strictly in seq order, waiting
  for gaps to fill, and whatever order they arrive in.
- `GET op_path(model_id, seq_id)?wait=<seconds>` long-polls the result. The header
  `X-Tinkerkube-Op-State` says `pending` (202, `OpPending` JSON), `complete` (200, the result:
  protobuf `ForwardBackwardOutput` for forward_backward, JSON for the rest) or `failed` (200,
  `OpFailure` JSON). Results are never popped on read; they stay re-readable for `RESULT_TTL_SECONDS`.
  A finished answer may carry `X-Tinkerkube-Op-Timing` (`OpTiming`: queue wait and run time).
- `PUT/GET sample_path(request_id)`: the same for samples (`SampleOp` JSON in, protobuf
  `tinker_public.SampleResponse` out). Samples are not seq-ordered against each other; they run
  between training ops, from the snapshot they name.
- `GET sample_progress_path(request_id)?after=N&wait=<seconds>` long-polls a sample's tokens decoded so far
  (`SampleProgress` JSON): it answers once a sequence holds more than `after` tokens (what every sequence
  decoded past `after`) or the sample finished (`state` not pending; read the result from the sample path).
  Sequences decode in lockstep, one token a step, so one cursor serves all of them. Progress is kept only
  while the sample runs; a sampler that cannot report it (vLLM) answers nothing until the end.
- `DELETE sample_path(request_id)` stops a sample: a waiting one fails at once, a running one leaves the
  decode at the next step and fails as cancelled (404 when unknown; a finished one stays as it was).
- Every request carries `X-Tinkerkube-Token` when the trainer has a token configured; otherwise 401.
- Errors are JSON `ErrorBody` with a 4xx/5xx status, never an empty body.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tinkerkube_contract.resource import LoraSpec, SessionMode

API_VERSION = "v1"
HEALTH_PATH = "/v1/healthz"  # liveness: the HTTP server answers
READY_PATH = "/v1/readyz"  # readiness: model loaded and every rank joined
INFO_PATH = "/v1/info"  # GET → TrainerInfo
METRICS_PATH = "/metrics"

HEADER_OP = "X-Tinkerkube-Op"
HEADER_OP_STATE = "X-Tinkerkube-Op-State"
HEADER_TOKEN = "X-Tinkerkube-Token"
HEADER_OP_TIMING = "X-Tinkerkube-Op-Timing"  # on a finished op or sample: `OpTiming.header()`

CONTENT_PROTOBUF = "application/x-protobuf"
CONTENT_JSON = "application/json"

RESULT_TTL_SECONDS = 3600
MAX_WAIT_SECONDS = 30.0
DEFAULT_MAX_TOKENS = 128  # what a sample request without sampling_params.max_tokens generates at most
# Caps on prompt_alt_tokens_k and its (len(prompt) - 1) * k answer cells (~3 MB); gateway and trainer check both.
MAX_PROMPT_ALT_TOKENS_K = 64
MAX_PROMPT_ALT_TOKEN_CELLS = 262_144


def op_path(model_id: str, seq_id: int) -> str:
    return f"/v1/models/{quote(model_id, safe='')}/ops/{int(seq_id)}"


def sample_path(request_id: str) -> str:
    return f"/v1/samples/{quote(request_id, safe='')}"


SAMPLE_PROGRESS_PATH = "/v1/sample-progress"


def sample_progress_path(request_id: str) -> str:
    return f"{SAMPLE_PROGRESS_PATH}/{quote(request_id, safe='')}"


RUNS_PATH = "/v1/runs"


def run_path(model_id: str) -> str:
    return f"{RUNS_PATH}/{quote(model_id, safe='')}"


class OpKind(StrEnum):
    FORWARD_BACKWARD = "forward_backward"  # protobuf body; forward_only inside it
    OPTIM_STEP = "optim_step"
    SAVE_STATE = "save_state"
    SAVE_SAMPLER_WEIGHTS = "save_sampler_weights"
    LOAD_STATE = "load_state"
    SAVE_EXTERNAL_WEIGHTS = "save_weights_external"
    SAMPLE = "sample"  # only on sample_path


class OpState(StrEnum):
    PENDING = "pending"
    COMPLETE = "complete"
    FAILED = "failed"


class ErrorCategory(StrEnum):
    """Mirrors the SDK's RequestErrorCategory so failed futures keep their category end to end."""

    USER = "user"
    SERVER = "server"
    UNKNOWN = "unknown"


class ErrorCode(StrEnum):
    """`ErrorBody.code` values the gateway acts on (the trainer sends others too, for people and metrics)."""

    UNKNOWN_OP = "unknown_op"  # polled an op this trainer boot never had, or whose result expired
    UNKNOWN_SAMPLE = "unknown_sample"
    SEQ_ID_REUSED = "seq_id_reused"
    SEQ_ID_STALE = "seq_id_stale"


class _Wire(BaseModel):
    # Lenient on input: a newer gateway may send fields an older trainer does not know.
    model_config = ConfigDict(extra="ignore", frozen=True)


class AdamParams(_Wire):
    # Finite only: pydantic would accept inf and then serialise it as JSON null on the way to the trainer.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0, description="0 disables clipping")

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # the tinker SDK serialises inf and NaN as null (pydantic's JSON mode)
            raise ValueError("must be a finite number, got null (the tinker SDK sends inf and NaN as null)")
        return value


class OptimStepOp(_Wire):
    adam_params: AdamParams = Field(default_factory=AdamParams)


class SaveStateOp(_Wire):
    """Adapter + optimizer state → `tinker://<model_id>/weights/<name>` (PEFT format on disk)."""

    name: str


class SaveSamplerWeightsOp(_Wire):
    """Adapter only. A `name` writes `.../sampler_weights/<name>` to disk; a `snapshot_id` keeps an
    in-memory copy of the weights as of this seq_id that samples can name (the ephemeral form that RL
    loops use every step). A named save also registers its tinker path as a snapshot id."""

    name: str | None = None
    snapshot_id: str | None = None


MAX_AGE_RECIPIENTS = 10  # the SDK documents "at most 10"


class SaveExternalWeightsOp(_Wire):
    """The adapter in PEFT's own layout (`adapter_model.safetensors` + `adapter_config.json`, nothing of
    ours) → `tinker://<model_id>/external_weights/<name>`, the files users download (`tinker checkpoint
    download`, the cookbook's `weights.download`). With `age_recipients` every file is encrypted to them
    (age format, `.age` suffix): the plaintext never sits in the checkpoint store."""

    name: str
    age_recipients: list[str] = Field(default_factory=list, max_length=MAX_AGE_RECIPIENTS)


class LoadStateOp(_Wire):
    path: str = Field(description="a tinker:// path of kind weights or sampler_weights")
    with_optimizer: bool = False


class SampleOp(_Wire):
    """`request` is the SDK's SampleRequest JSON as received (prompt, sampling_params, flags); image chunks
    travel in it as the SDK sends them (base64 `data`, `format`, `expected_tokens`), already bounds-checked.
    `model_id` names the attached run whose weights sample (None: the pool's base model alone);
    `snapshot_id` one of that run's saved snapshots (None: its weights now)."""

    request: dict[str, Any]
    model_id: str | None = None
    snapshot_id: str | None = Field(None, description="None: the weights the run serves now")


class SequenceProgress(_Wire):
    """One sequence's tokens past the reader's cursor, with their logprobs and (when asked) top-k rows.
    A logprob too small for a float travels as JSON's -Infinity (Python's json reads it)."""

    model_config = ConfigDict(extra="ignore", frozen=True, ser_json_inf_nan="constants")

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None


class SampleProgress(_Wire):
    """`GET sample_progress_path`: `next` is the cursor for the following read (the longest sequence's length)."""

    state: OpState
    next: int = 0
    sequences: list[SequenceProgress] = Field(default_factory=list)


class OptimStepResult(_Wire):
    metrics: dict[str, float] = Field(default_factory=dict)


class CheckpointWritten(_Wire):
    tinker_path: str
    kind: Literal["weights", "sampler_weights", "external_weights"]
    size_bytes: int


class SaveResult(_Wire):
    checkpoint: CheckpointWritten | None = None
    snapshot_id: str | None = None


class LoadResult(_Wire):
    path: str


class OpPending(_Wire):
    state: Literal["pending"] = "pending"
    queue_position: int | None = None


class OpTiming(_Wire):
    """How long a finished op waited in the trainer's queue and ran, in seconds. Durations, not times:
    the trainer's clock is monotonic and not the gateway's; the gateway places them before the moment
    it read the result (the session trace export shows them)."""

    wait_s: float = Field(ge=0)
    run_s: float = Field(ge=0)

    def header(self) -> str:
        return f"wait={self.wait_s:.6f};run={self.run_s:.6f}"

    @classmethod
    def parse(cls, value: str | None) -> OpTiming | None:
        """None for a missing or unreadable header (an older trainer sends none)."""
        if not value:
            return None
        try:
            parts = dict(item.split("=", 1) for item in value.split(";"))
            return cls(wait_s=float(parts["wait"]), run_s=float(parts["run"]))
        except (ValueError, KeyError):
            return None


class OpFailure(_Wire):
    """The shape of a failed future in the SDK too: `{"error", "category"}`."""

    error: str
    category: ErrorCategory = ErrorCategory.SERVER


class ErrorBody(_Wire):
    detail: str
    code: str
    category: ErrorCategory = ErrorCategory.USER


class RunSpec(_Wire):
    """`PUT run_path(model_id)`: attach a run to the pool (its own adapter, optimizer, snapshots and
    ordered op queue). Idempotent for the same spec; `base_model` must be the pool's."""

    model_id: str = Field(min_length=1, max_length=253)
    base_model: str
    mode: SessionMode = SessionMode.TRAIN
    lora: LoraSpec = Field(default_factory=LoraSpec)
    restore_from: str | None = Field(None, description="tinker:// path restored at attach")
    restore_optimizer: bool = False
    resume: bool = Field(False, description="restore this run's newest durable checkpoint (its own save_state or "
                         "automatic checkpoint, with the optimizer) when one exists, else `restore_from`: how a "
                         "run comes back after its pool restarted")


class RunState(StrEnum):
    ATTACHING = "attaching"
    READY = "ready"
    FAILED = "failed"


class PoolInfo(_Wire):
    """`GET INFO_PATH`: the pool and the runs it holds."""

    base_model: str
    world_size: int
    ready: bool
    boot_id: str = Field(description="changes on every start: a new value means every run was lost")
    max_runs: int
    max_lora_rank: int
    runs: list[str] = Field(default_factory=list)
    tokenizer_dir: str | None = None
    vocab_size: int | None = None


class TrainerInfo(_Wire):
    model_id: str
    base_model: str
    mode: SessionMode
    lora: LoraSpec
    world_size: int
    ready: bool
    boot_id: str = Field(description="changes on every start: a new value means state was lost")
    tokenizer_dir: str | None = None
    vocab_size: int | None = None
    last_completed_seq_id: int | None = None
    restored_from: str | None = None


class RunInfo(TrainerInfo):
    """`GET run_path(model_id)` (and the answer to its PUT). `boot_id` is this attachment's id: a new
    value means the run's in-memory state was rebuilt (restored from `restored_from`, or fresh)."""

    state: RunState = RunState.READY
    error: str | None = None
    num_bytes: int | None = Field(None, description="what the run holds beyond the shared base model: adapter, "
                                  "optimizer moments, gradient accumulator, snapshots")


# ---------------------------------------------------------------- text: the served model's tokenizer
# The gateway's OpenAI/Anthropic-compatible endpoints need the model's chat template and tokenizer, and
# the gateway holds no model files (in Kubernetes its pod has none): the trainer that backs the sampler
# renders, encodes and decodes. POST JSON in, JSON out; errors are `ErrorBody` 4xx like the op routes.

TEXT_CHAT_PATH = "/v1/text/chat"  # RenderChatsRequest → RenderedChats (a row or an error per chat)
TEXT_ENCODE_PATH = "/v1/text/encode"  # EncodeRequest → TokenIds
TEXT_DECODE_PATH = "/v1/text/decode"  # DecodeRequest → DecodedTexts

MAX_TEXT_ITEMS = 1024  # messages, texts or sequences in one text request


class ChatMessage(_Wire):
    """One chat turn, content already flattened to text (the gateway refuses non-text parts)."""

    role: str = Field(min_length=1, max_length=64)
    content: str


class RenderChatRequest(_Wire):
    """Apply the tokenizer's own chat template, then encode (no special tokens added twice)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="continue the last (assistant) turn: a prefill")


class RenderChatsRequest(_Wire):
    """Several chats in one call: the gateway merges concurrent requests' chats (each may fail alone)."""

    chats: list[RenderChatRequest] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)


class RenderedChat(_Wire):
    ids: list[int] = Field(default_factory=list)
    error: str | None = Field(None, description="why this chat could not be rendered (the caller's fault)")


class RenderedChats(_Wire):
    chats: list[RenderedChat]
    context_length: int | None = Field(None, description="the model's maximum positions, when it states one")


class EncodeRequest(_Wire):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    add_special_tokens: bool = True


class TokenIds(_Wire):
    ids: list[list[int]]
    context_length: int | None = Field(None, description="the model's maximum positions, when it states one")


class DecodeRequest(_Wire):
    sequences: list[list[int]] = Field(min_length=1, max_length=MAX_TEXT_ITEMS)
    pieces: bool = Field(False, description="also each token's own text and whether it is a special token")


class DecodedText(_Wire):
    text: str = Field(description="the whole sequence, special tokens skipped")
    pieces: list[str] | None = None
    special: list[bool] | None = None


class DecodedTexts(_Wire):
    sequences: list[DecodedText]
    context_length: int | None = None
