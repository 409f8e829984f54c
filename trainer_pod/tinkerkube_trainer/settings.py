"""The trainer's configuration: `TrainerSettings` (our variables) and `DistEnv` (torchrun's).

The only module that reads the process environment. `main.py` reads both once and passes them down;
nothing else looks at `os.environ`. Variable names are those of `tinkerkube_contract.env`, which the
launchers write through `tinkerkube_contract.launch.trainer_env`.
"""

from __future__ import annotations

import hashlib
import json
import os
from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinkerkube_contract import env
from tinkerkube_contract.models import default_cache_dir
from tinkerkube_contract.pod_api import MAX_WAIT_SECONDS, RESULT_TTL_SECONDS, RunSpec
from tinkerkube_contract.resource import TRAINER_PORT, LoraSpec, SessionMode
from tinkerkube_trainer.engine_api import PoolConfig
from tinkerkube_trainer.vllm_server import VllmServerConfig


class SamplerKind(StrEnum):
    """Which code serves a pool's sample ops (`env.SAMPLER`)."""

    HF = "hf"
    VLLM = "vllm"


class TrainerSettings(BaseSettings):
    """`TINKERKUBE_TRAINER_*`. Complex values (LORA, MODEL_ALIASES) are JSON."""

    model_config = SettingsConfigDict(env_prefix=env.PREFIX, extra="forbid", case_sensitive=False)

    base_model: str = Field(description="the pool's resident base model: a built-in name, an alias, a local "
                            "directory or a hub id")
    model_id: str | None = Field(None, description="a run attached at boot (a pool started for one run); "
                                 "the next four fields describe it")
    mode: SessionMode = Field(SessionMode.TRAIN, description="the boot run: train (LoRA training) or sample")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="the boot run: JSON of tinkerkube_contract LoraSpec")
    restore_from: str | None = Field(None, description="the boot run: tinker:// path restored at attach")
    restore_optimizer: bool = Field(False, description="the boot run: also restore the optimizer state")
    max_runs: int = Field(8, ge=1, le=1024, description="runs this pool holds at once")
    max_lora_rank: int = Field(128, ge=1, le=512, description="largest LoRA rank a run may ask for")
    max_pass_tokens: int = Field(65_536, ge=1, description="tokens of co-batched forward/backward ops per pass")
    max_sample_rows: int = Field(64, ge=1, description="sequences decoded together in one sampling pass")
    max_snapshots_per_run: int = Field(8, ge=1, le=1024, description="in-memory sampler snapshots kept per run")
    auto_checkpoint_steps: int = Field(20, ge=0, description="write a run's weights + optimizer every this many "
                                       "optim_steps, off the op thread (0: never); bounds what a restart replays")
    auto_checkpoint_seconds: float = Field(600.0, gt=0, description="... or at the first optim_step this long "
                                           "after the run's last automatic checkpoint")
    auto_checkpoints_kept: int = Field(2, ge=1, description="a run's older automatic checkpoints are deleted")
    max_sample_tokens: int = Field(262_144, ge=1, description="cap on num_samples x max_tokens of one sample request")
    sampler: SamplerKind = Field(SamplerKind.HF, description="hf: our own batched decode loop (CPU default); vllm: "
                                 "sample ops go to a vLLM OpenAI server of the base model, each run's sampler "
                                 "weights loaded into it as LoRA adapters (GPU pools; see docs/operations.md)")
    vllm_url: str | None = Field(None, description="sampler=vllm: URL of a vLLM OpenAI server already running the "
                                 "pool's base model with --enable-lora and runtime LoRA updating (a sidecar); it "
                                 "must read vllm_adapter_dir. Unset: the trainer starts its own server")
    vllm_python: str = Field("python3", description="sampler=vllm without vllm_url: the Python of the venv that "
                             "holds vLLM (it cannot share the trainer's venv); rank 0 runs its OpenAI server")
    vllm_dtype: str = Field("float32", description="dtype of the server the trainer starts: float32 gives "
                            "sampling logprobs equal to the learner's to ~1e-5 (exact RL importance ratios); "
                            "bfloat16 is faster but off by up to ~0.3 per token")
    vllm_args: list[str] = Field(default_factory=list, description="JSON list of extra arguments for the server "
                                 "the trainer starts (e.g. [\"--gpu-memory-utilization\", \"0.5\"])")
    vllm_env: dict[str, str] = Field(default_factory=dict, description="JSON {name: value}, extra environment "
                                     "of the server the trainer starts (e.g. VLLM_CPU_KVCACHE_SPACE)")
    vllm_adapter_dir: Path | None = Field(None, description="where sampler weights are written for vLLM to load "
                                          "(shared with a vllm_url server); unset: a private temporary directory")
    vllm_max_adapters: int = Field(16, ge=1, description="adapters kept loaded in vLLM; the least recently "
                                   "used are unloaded beyond this")
    vllm_start_timeout_seconds: float = Field(900.0, gt=0, description="how long the started server may take to "
                                              "become healthy")
    checkpoint_dir: Path = Field(Path("var/checkpoints"), description="root of the checkpoint store")
    model_cache_dir: Path = Field(default_factory=default_cache_dir, description="built-in models live here")
    model_aliases: dict[str, str] = Field(default_factory=dict, description="JSON {name: name-or-dir}")
    host: str = Field("0.0.0.0", description="rank 0's HTTP bind address")
    port: int = Field(TRAINER_PORT, ge=0, le=65535, description="rank 0's HTTP port; 0 picks a free one")
    auth_token: SecretStr | None = Field(None, description="required in X-Tinkerkube-Token when set")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto | cpu | cuda")
    sharding: str = Field("replicate", pattern="^(replicate|fsdp)$", description="replicate: every rank holds the "
                          "whole base; fsdp: the ranks shard the frozen base (FSDP2), each holding ~1/N of it")
    log_level: str = Field("INFO", description="logging level name")
    # Runtime knobs beyond the contract (defaults suit every launcher; no launcher needs to set them).
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0, description="larger request bodies get a 413")
    result_ttl_seconds: float = Field(RESULT_TTL_SECONDS, gt=0, description="how long results stay re-readable")
    max_retained_results: int = Field(100_000, gt=0, description="cap on finished entries kept in memory")
    max_wait_seconds: float = Field(MAX_WAIT_SECONDS, gt=0, description="longest long-poll a GET may ask for")
    collective_timeout_seconds: float = Field(
        600.0, gt=0, description="tensor-collective timeout: ranks arrive within this of each other or fail")
    heartbeat_seconds: float = Field(5.0, gt=0, description="idle rank 0 checks every rank is alive this often")
    engine_factory: str = Field("tinkerkube_trainer.engine:build_engine",
                                description="module:callable(pool_config, collective) -> Engine (tests swap in fakes)")
    pass_journal: Path | None = Field(None, description="rank 0's journal of the running training pass, so that an "
                                      "op that crashes the process fails alone (pass_journal.py); unset: "
                                      "CHECKPOINT_DIR/.pass-journal/<hash of MODEL_ID>.json when MODEL_ID is set "
                                      "(the operator sets it for a TrainerPool's pods: "
                                      "CHECKPOINT_DIR/.pass-journal/pool-<namespace>-<name>.json)")
    port_file: Path | None = Field(None, description="if set, rank 0 writes its bound port here (tests, port 0)")

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    def pass_journal_path(self) -> Path | None:
        """Where the pass journal lives: beside the pool's durable state, one file per pool (a pool started
        for one run is named by it); None (off) for a shared pool that sets none."""
        if self.pass_journal is not None:
            return self.pass_journal
        if not self.model_id:
            return None
        return self.checkpoint_dir / ".pass-journal" / f"{hashlib.sha256(self.model_id.encode()).hexdigest()[:24]}.json"

    def pool_config(self) -> PoolConfig:
        return PoolConfig(
            base_model=self.base_model,
            checkpoint_dir=self.checkpoint_dir,
            model_cache_dir=self.model_cache_dir,
            model_aliases=dict(self.model_aliases),
            device=self.device,
            sharding=self.sharding,
            max_runs=self.max_runs,
            max_lora_rank=self.max_lora_rank,
            max_snapshots_per_run=self.max_snapshots_per_run,
            auto_checkpoint_steps=self.auto_checkpoint_steps,
            auto_checkpoint_seconds=self.auto_checkpoint_seconds,
            auto_checkpoints_kept=self.auto_checkpoints_kept,
            max_sample_tokens=self.max_sample_tokens,
            sampler=self.sampler.value,
            vllm=None if self.sampler is SamplerKind.HF else VllmServerConfig(
                url=self.vllm_url, python=self.vllm_python, dtype=self.vllm_dtype, extra_args=tuple(self.vllm_args),
                env={**os.environ, **self.vllm_env}, adapter_dir=self.vllm_adapter_dir,
                max_adapters=self.vllm_max_adapters, start_timeout_seconds=self.vllm_start_timeout_seconds),
        )

    def boot_run(self) -> RunSpec | None:
        if self.model_id is None:
            return None
        return RunSpec(model_id=self.model_id, base_model=self.base_model, mode=self.mode, lora=self.lora,
                       restore_from=self.restore_from, restore_optimizer=self.restore_optimizer)

    @property
    def token(self) -> str | None:
        return self.auth_token.get_secret_value() if self.auth_token else None

    def to_env(self) -> dict[str, str]:
        """The inverse of reading: every set field as `TINKERKUBE_TRAINER_*` strings."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            if name == "auth_token":
                value = self.token
            elif name == "lora":
                value = self.lora.model_dump_json()
            elif isinstance(value, dict | list):
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[env.PREFIX + name.upper()] = str(value)
        return out


class DistEnv(BaseSettings):
    """What torchrun tells each worker. Without torchrun: one rank, world size one."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=True)

    RANK: int = Field(0, ge=0)
    LOCAL_RANK: int = Field(0, ge=0)
    WORLD_SIZE: int = Field(1, ge=1)
    LOCAL_WORLD_SIZE: int = Field(1, ge=1)
    GROUP_RANK: int = Field(0, ge=0, description="the node rank")
    MASTER_ADDR: str = "127.0.0.1"
    MASTER_PORT: int = Field(29500, ge=0, le=65535)
    TORCHELASTIC_RUN_ID: str | None = None

    @property
    def rank(self) -> int:
        return self.RANK

    @property
    def local_rank(self) -> int:
        return self.LOCAL_RANK

    @property
    def world_size(self) -> int:
        return self.WORLD_SIZE

    @property
    def node_rank(self) -> int:
        return self.GROUP_RANK

    @property
    def is_leader(self) -> bool:
        return self.RANK == 0

    @property
    def under_torchrun(self) -> bool:
        return self.TORCHELASTIC_RUN_ID is not None
