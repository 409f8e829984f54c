"""The gateway's configuration: `GatewaySettings` (`TINKERKUBE_GATEWAY_*`).

The only module that reads the process environment. `main.py` reads it once and passes it down.
Complex values (API_KEYS, MODEL_ALIASES, TRAINER_COMMAND) are JSON.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinkerkube_contract.models import DEFAULT_MODEL
from tinkerkube_gateway import bounds
from tinkerkube_gateway.services.image_assets import parse_host_pattern

ENV_PREFIX = "TINKERKUBE_GATEWAY_"
LOCAL_DEV_KEY = "tml-local"
LOCAL_DEV_TENANT = "local"


class BackendKind(StrEnum):
    LOCAL = "local"
    KUBERNETES = "kubernetes"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    state_dir: Path = Field(Path("var"), description="local state: SQLite DB, checkpoints, trainer logs")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<state_dir>/gateway.db (postgresql+psycopg://... for HA)")
    checkpoint_dir: Path | None = Field(None, description="checkpoint store root; default <state_dir>/checkpoints")
    backend: BackendKind = Field(BackendKind.LOCAL, description="where trainers run: local | kubernetes")
    api_keys: dict[str, str] = Field(default_factory=dict, description="JSON {api_key: tenant}; keys start 'tml-'")
    api_keys_file: Path | None = Field(None, description="JSON file {api_key: tenant}, merged with api_keys")
    default_base_model: str = Field(DEFAULT_MODEL, description="base model offered first by capabilities")
    models: list[str] = Field(default_factory=list, description="JSON list of servable base models (capabilities); "
                              "empty: the built-ins plus aliases")
    model_cache_dir: Path = Field(Path(".cache/models"), description="where built-in models are materialised")
    model_aliases: dict[str, str] = Field(default_factory=dict, description="JSON {name: built-in name or dir}")
    session_idle_timeout_seconds: float = Field(
        300.0, gt=0, description="a session without heartbeats this long is reaped (trainers stopped)")
    reaper_interval_seconds: float = Field(5.0, gt=0, description="how often idle sessions and TTLs are checked")
    long_poll_seconds: float = Field(30.0, gt=0, le=40, description="retrieve_future holds this long, then try_again")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0, description="larger request bodies get a 413 JSON error")
    seq_gap_timeout_seconds: float = Field(
        bounds.SEQ_GAP_TIMEOUT_SECONDS, gt=0, description="ops waiting behind a seq_id that never arrives fail "
        "after this long, naming it; the gap is sealed (a late arrival is refused) and later ops go on")
    max_seq_ahead: int = Field(
        bounds.MAX_SEQ_AHEAD, ge=1, description="how far past a run's next expected seq_id a submit may be (a 400 "
        "beyond, which leaves that seq_id free); also the longest gap sealed seq_id by seq_id")
    max_sample_tokens: int = Field(
        bounds.MAX_SAMPLE_TOKENS, ge=1, description="most tokens one sample request may generate "
        "(num_samples * max_tokens); a 400 beyond")
    trainer_nproc_per_node: int = Field(1, ge=1, le=8, description="torchrun ranks per local trainer")
    trainer_device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="device for local trainers")
    trainer_sharding: str = Field("replicate", pattern="^(replicate|fsdp)$", description="local trainer pools: "
                                  "replicate the base on every rank, or shard it over the ranks (FSDP2)")
    trainer_sampler: str = Field("hf", pattern="^(hf|vllm)$", description="local trainer pools' sampler: hf (the "
                                 "trainer's own batched decode) or vllm (a vLLM server per pool; the trainer's "
                                 "TINKERKUBE_TRAINER_VLLM_* variables say which, see operations.md)")
    trainer_start_timeout_seconds: float = Field(300.0, gt=0, description="longest wait for a trainer's readiness")
    pool_max_runs: int = Field(8, ge=1, le=1024, description="runs (and samplers) one trainer pool holds")
    pool_idle_timeout_seconds: float = Field(
        300.0, ge=0, description="a local trainer pool with no run left stops after this long")
    share_pools_across_tenants: bool = Field(
        False, description="let runs of different tenants share a trainer pool (same base model)")
    pool_max_restarts: int = Field(
        3, ge=0, description="a local pool that died is started again at most this often within the window")
    pool_restart_window_seconds: float = Field(600.0, gt=0, description="the window of pool_max_restarts")
    pool_hang_seconds: float = Field(
        60.0, gt=0, description="a local pool that answers no health check for this long is killed and restarted")
    trainer_auto_checkpoint_steps: int | None = Field(
        None, ge=0, description="local pools write each run's weights + optimizer every N optim_steps (bounds what "
        "a restart replays; 0 never; unset: the trainer's default, 20)")
    trainer_command: list[str] | None = Field(
        None, description="JSON argv replacing torchrun for local trainers (tests use a fake trainer)")
    # Trainer placement (kubernetes backend; local mode uses nproc_per_node and the token only).
    namespace: str = Field("default", description="namespace of the TrainingSession resources (kubernetes backend)")
    kubeconfig: str | None = Field(None, description="kubeconfig path; default: in-cluster config")
    kube_api_url: str | None = Field(None, description="Kubernetes API URL override (tests: an emulator)")
    trainer_auth_token: SecretStr | None = Field(
        None, description="token trainers require (X-Tinkerkube-Token); default: random per gateway (local)")
    trainer_image: str | None = Field(None, description="trainer image override for TrainingSessions")
    trainer_replicas: int = Field(1, ge=1, le=64, description="trainer pods per run")
    trainer_gpus: int = Field(0, ge=0, le=8, description="GPUs per trainer pod")
    trainer_cpu: str | None = Field(None, description="CPU request/limit per trainer pod, e.g. '4'")
    trainer_memory: str | None = Field(None, description="memory per trainer pod, e.g. '16Gi'")
    trainer_node_selector: dict[str, str] = Field(default_factory=dict, description="JSON nodeSelector for trainers")
    trainer_tolerations: list[dict[str, Any]] = Field(default_factory=list, description="JSON tolerations")
    trainer_priority_class_name: str | None = Field(None, description="priorityClassName of trainer pods")
    trainer_idle_timeout_seconds: int = Field(
        3600, ge=0, description="TrainingSession idleTimeoutSeconds: the operator's backstop for runs whose "
        "gateway vanished (heartbeating sessions keep their runs fresh); 0 disables")
    proto_compress_fwdbwd: bool = Field(False, description="ask the SDK to zstd-compress forward_backward bodies")
    fwdbwd_max_chunk_len: int = Field(1024, ge=1, description="datums per forward_backward request (client config)")
    trainer_request_timeout_seconds: float = Field(60.0, gt=0, description="HTTP timeout for gateway→trainer calls")
    access_log: bool = Field(
        False, description="log every HTTP request (uvicorn's access log). Off by default: the SDK long-polls "
        "retrieve_future and heartbeats, and /metrics counts requests by endpoint and status")
    public_url: str | None = Field(
        None, description="the gateway's address as users reach it (e.g. https://tinker.example.com behind an "
        "ingress), for the download URLs it signs; default: the address each request was sent to")
    download_url_ttl_seconds: float = Field(
        3600.0, ge=60, le=7 * 24 * 3600, description="how long the signed download URLs of external weights and "
        "session traces stay valid")
    sample_use_retrieve_futures: bool = Field(
        True, description="tell the SDK to poll a sampling session's completions with one retrieve_futures "
        "long-poll instead of one retrieve_future per sample (client config)")
    sample_cancel_enabled: bool = Field(
        True, description="tell the SDK to send cancel_future for samples it abandons (dynamic client config)")
    pool_max_inflight_samples: int = Field(
        64, ge=1, le=100_000, description="samples one trainer pool runs at once; more wait in the gateway, their "
        "futures saying paused_capacity")
    pool_sample_queue: int = Field(
        1024, ge=0, le=1_000_000, description="samples that may wait for one trainer pool; asample answers 429 "
        "(Retry-After) beyond")
    tenant_max_concurrent_samples: int = Field(
        0, ge=0, le=100_000, description="samples one tenant runs at once (0: no limit); more wait, their futures "
        "saying paused_rate_limit")
    tenant_sample_queue: int = Field(
        1024, ge=0, le=1_000_000, description="samples one tenant may have waiting; asample answers 429 beyond")
    tenant_sampled_tokens_per_minute: int = Field(
        0, ge=0, description="tokens one tenant may sample per minute (num_samples x max_tokens reserved at start, "
        "the unused part returned); 0: no limit")
    auth_jwt_enabled: bool = Field(
        True, description="tell the SDK to exchange its API key for short-lived JWTs (POST /api/v1/auth/token, "
        "client config pjwt_auth_enabled) and send those; API keys keep working either way")
    auth_token_ttl_seconds: int = Field(
        3600, ge=180, le=24 * 3600, description="lifetime of the JWTs auth/token mints (the SDK renews them at "
        "about half of it)")
    image_asset_hosts: list[str] = Field(
        default_factory=list, description="JSON list of the hosts whose http(s) URLs image_asset_pointer chunks may "
        "name: 'name', 'name:port' or '*.suffix' (any subdomain); empty (the default): no URL is fetched")
    image_asset_root: Path | None = Field(
        None, description="directory whose files image_asset_pointer chunks may name (a relative path, or an "
        "absolute path or file:// URL inside it; no escape by '..' or symlinks); unset (the default): no path is read")
    image_asset_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="longest time resolving all image_asset_pointer chunks of one request may "
        "take; a 400 beyond")
    lease_seconds: float = Field(
        15.0, ge=1, le=300, description="PostgreSQL (several replicas): a run's dispatching replica renews its "
        "lease every third of this; another replica takes the run over once it has expired")
    audit_retention_days: int = Field(
        400, ge=0, le=36_500, description="audit log entries (GET /api/v1/audit) older than this many days are "
        "deleted by the periodic maintenance (reaper_interval_seconds), a bounded batch at a time; 0 keeps them")
    usage_retention_days: int = Field(
        400, ge=0, le=36_500, description="usage records (GET /api/v1/billing/usage/events) older than this many "
        "days are deleted the same way; 0 keeps them")

    @field_validator("api_keys")
    @classmethod
    def _keys_have_prefix(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not k.startswith("tml-")]
        if bad:
            raise ValueError(f"API keys must start with 'tml-' (the SDK refuses others): {len(bad)} do not")
        return value

    @field_validator("image_asset_hosts")
    @classmethod
    def _hosts_are_patterns(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_host_pattern(entry)
        return value

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.state_dir / 'gateway.db').resolve()}"

    @property
    def multi_replica(self) -> bool:
        """PostgreSQL: replicas may share the store (leases, LISTEN/NOTIFY). SQLite: one process."""
        return self.effective_database_url.startswith("postgresql")

    @property
    def effective_checkpoint_dir(self) -> Path:
        return (self.checkpoint_dir or self.state_dir / "checkpoints").resolve()

    @property
    def logs_dir(self) -> Path:
        return (self.state_dir / "logs").resolve()

    # The names KubernetesBackend.from_settings reads (kube_*), mapped onto the chart's variables.
    @property
    def kube_namespace(self) -> str:
        return self.namespace

    @property
    def kube_kubeconfig(self) -> str | None:
        return self.kubeconfig

    @property
    def kube_token(self) -> str | None:
        return self.trainer_auth_token.get_secret_value() if self.trainer_auth_token else None

    @property
    def kube_idle_timeout_seconds(self) -> int:
        return self.trainer_idle_timeout_seconds

    def tenant_keys(self) -> dict[str, str]:
        """Key → tenant. With no keys configured anywhere, the local dev key `tml-local` → `local`."""
        keys = dict(self.api_keys)
        if self.api_keys_file is not None:
            keys.update(self._keys_have_prefix(json.loads(self.api_keys_file.read_text())))
        return keys or {LOCAL_DEV_KEY: LOCAL_DEV_TENANT}


def inherited_environment() -> dict[str, str]:
    """The gateway's own environment, for child trainer processes (PATH, HOME, venv, ...)."""
    import os

    return dict(os.environ)
