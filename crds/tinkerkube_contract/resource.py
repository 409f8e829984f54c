"""The TrainingSession custom resource: identity, labels and the spec/status shapes.

`crds/trainingsession.yaml` is the schema the API server enforces; these pydantic models are the
typed view both writers use (the gateway creates specs and writes `status.futures`, the operator
writes the rest of status). A drift test keeps the two in step.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "tinkerkube.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingSession"
PLURAL = "trainingsessions"
SINGULAR = "trainingsession"
SHORT_NAME = "ts"

FINALIZER = f"{GROUP}/cleanup"
LABEL_SESSION = f"{GROUP}/session"  # the TrainingSession's name, on every owned object
LABEL_TENANT = f"{GROUP}/tenant"
LABEL_TINKER_SESSION = f"{GROUP}/tinker-session"  # the SDK's session id (create_session)
LABEL_ROLE = f"{GROUP}/role"  # "trainer" on pods
LABEL_NODE_RANK = f"{GROUP}/node-rank"
LABEL_GENERATION = f"{GROUP}/pod-generation"  # bumps when the operator recreates the pod set
ANNOTATION_MODEL_ID = f"{GROUP}/model-id"  # the Tinker model/sampler id (names must be DNS-safe)
LABEL_POOL = f"{GROUP}/pool"  # the TrainerPool's name, on its pods and service
LABEL_BASE_MODEL = f"{GROUP}/base-model"  # on TrainerPools: label_value(spec.baseModel), for selection

POOL_KIND = "TrainerPool"
POOL_PLURAL = "trainerpools"
POOL_SINGULAR = "trainerpool"
POOL_SHORT_NAME = "tp"

TRAINER_PORT = 8080  # the internal HTTP API on rank 0
RENDEZVOUS_PORT = 29500  # torchrun master port


class _CamelModel(BaseModel):
    """Serialises to the camelCase the Kubernetes API uses; accepts both spellings on input."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SessionMode(StrEnum):
    TRAIN = "train"
    SAMPLE = "sample"


class LoraSpec(_CamelModel):
    """Where adapters go and how they start. Immutable for the life of a run."""

    rank: int = Field(32, ge=1, le=512)
    alpha: float = Field(32.0, gt=0)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    seed: int | None = None


class Resources(_CamelModel):
    gpus: int = Field(0, ge=0, le=8, description="GPUs per pod; procsPerPod ranks share them one each")
    cpu: str | None = None
    memory: str | None = None


class CheckpointStore(_CamelModel):
    """Where checkpoints live: a PVC shared by trainers (and the gateway for reads), or a hostPath."""

    pvc_name: str | None = None
    host_path: str | None = None
    mount_path: str = "/checkpoints"


class PodSetSpec(_CamelModel):
    """What a trainer pod set is made of: shared by TrainingSessions (which carry the placement their pool
    is created with) and TrainerPools (which the operator renders into pods, `manifests.pods`)."""

    base_model: str
    replicas: int = Field(1, ge=1, le=64)
    procs_per_pod: int = Field(1, ge=1, le=8)
    resources: Resources = Field(default_factory=Resources)
    image: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    checkpoint_store: CheckpointStore = Field(default_factory=CheckpointStore)
    idle_timeout_seconds: int = Field(3600, ge=0, description="0 disables idle reaping")

    @property
    def world_size(self) -> int:
        return self.replicas * self.procs_per_pod


class TrainingSessionSpec(PodSetSpec):
    lora: LoraSpec = Field(default_factory=LoraSpec)
    mode: SessionMode = SessionMode.TRAIN
    model_id: str = Field(description="the Tinker id served: '<session>:train:<n>' or '<session>:sample:<n>'")
    restore_from: str | None = Field(None, description="tinker:// path restored at start")
    restore_optimizer: bool = False
    owner: str = Field(description="the tenant that owns this session")
    tinker_session: str | None = None


class Sharding(StrEnum):
    REPLICATE = "replicate"  # every rank holds the whole base model (data parallel)
    FSDP = "fsdp"  # the base model sharded over the ranks


class Sampler(StrEnum):
    HF = "hf"  # generation with transformers inside the trainer
    VLLM = "vllm"


class TrainerPoolSpec(PodSetSpec):
    """A trainer pod set holding one base model resident, to which TrainingSessions' runs attach."""

    max_runs: int = Field(8, ge=1, le=256, description="runs attached at once")
    max_lora_rank: int = Field(512, ge=1, le=512)
    owner: str = Field("", description="the tenant it serves; empty: a warm pool, claimed by the first binding")
    sharding: Sharding = Sharding.REPLICATE
    sampler: Sampler = Sampler.HF


class Endpoint(_CamelModel):
    url: str
    pod_name: str | None = None
    service_name: str | None = None


class RecentFuture(_CamelModel):
    request_id: str
    op: str
    seq_id: int | None = None
    state: str  # pending | complete | failed
    updated_at: str | None = None


class FuturesStatus(_CamelModel):
    """Aggregates only, plus a short window: etcd objects are small and status writes are dear."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    pending: int = 0
    last_seq_id: int | None = None
    last_completed_seq_id: int | None = None
    updated_at: str | None = None
    recent: list[RecentFuture] = Field(default_factory=list, max_length=16)


RECENT_FUTURES_WINDOW = 16


class Condition(_CamelModel):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PodSetStatus(_CamelModel):
    """The operator's view of a pod set (a TrainerPool, or a TrainingSession with pods of its own)."""

    phase: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    world_size: int | None = None  # replicas x procsPerPod, for the Ranks printer column
    endpoint: Endpoint | None = None
    restarts: int = 0


class TrainingSessionStatus(PodSetStatus):
    pool: str | None = Field(None, description="the TrainerPool serving this run (pool binding)")
    last_checkpoint: str | None = None
    futures: FuturesStatus | None = None


class TrainerPoolStatus(PodSetStatus):
    runs_used: int = 0
    runs_free: int | None = None
    runs: list[str] = Field(default_factory=list, description="TrainingSessions bound to it", max_length=256)
    idle_since: str | None = None  # when its last run left (idle reaping)


# One writer per status subtree: the operator never touches `futures`, the gateway touches only it.
GATEWAY_STATUS_FIELDS = frozenset({"futures", "lastCheckpoint"})


def label_value(value: str) -> str:
    """A valid label value (≤63 chars, [A-Za-z0-9._-], alphanumeric ends) for tenants and session ids;
    values that had to change keep a hash suffix so that distinct inputs stay distinct."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", value).strip("-._")
    if clean == value and len(clean) <= 63:
        return clean
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{clean[:54].strip('-._')}-{digest}".strip("-")
