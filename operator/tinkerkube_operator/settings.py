"""The operator's configuration: `OperatorSettings` (`TINKERKUBE_OPERATOR_*`), read once in `main.py`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TINKERKUBE_OPERATOR_"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    namespaces: list[str] = Field(default_factory=list, description="JSON list of namespaces; empty: cluster-wide")
    api_url: str | None = Field(None, description="explicit API server URL (no auth); default in-cluster/kubeconfig")
    trainer_image: str = Field("ghcr.io/tinkerkube/trainer:0.1.0", description="image when spec.image is unset")
    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    trainer_python: str = Field("python", description="the Python interpreter inside the trainer image")
    service_account: str | None = Field(None, description="service account for trainer pods")
    trainer_run_as_user: int = Field(10001, ge=1, description="non-root uid (and gid, fsGroup) of trainer pods; "
                                     "the trainer image's user")
    trainer_shm_size: str = Field("1Gi", description="size of the in-memory /dev/shm of trainer pods (NCCL and "
                                  "torch need more than the runtime's 64Mi); empty disables")
    max_restarts: int = Field(3, ge=0, description="pod-set recreations before the session is Failed")
    backoff_seconds: float = Field(5.0, ge=0, description="delay before the first recreation; doubles each time")
    backoff_max_seconds: float = Field(300.0, ge=0, description="cap on the recreation delay")
    unschedulable_timeout_seconds: float = Field(300.0, ge=0, description="unschedulable this long → Failed")
    image_pull_timeout_seconds: float = Field(300.0, ge=0, description="image pull failing this long → Failed")
    auth_token_secret: str | None = Field(
        "tinkerkube-trainer-token", description="Secret holding the gateway↔trainer token; unset: no token")
    auth_token_secret_key: str = Field("token", description="key of the token in that Secret")
    checkpoint_pvc: str | None = Field(None, description="default checkpoint PVC when spec.checkpointStore has none")
    checkpoint_host_path: str | None = Field(None, description="default checkpoint hostPath (single-node clusters)")
    model_cache_dir: str | None = Field(None, description="model cache dir inside trainer pods")
    model_cache_pvc: str | None = Field(None, description="PVC mounted at model_cache_dir, if any")
    cluster_domain: str = Field("cluster.local", description="DNS suffix for the headless Service names")
    reconcile_interval_seconds: float = Field(10.0, gt=0, description="timer: idle reaping, backoff, timeouts")
    peering_name: str = Field("tinkerkube", description="kopf peering object; replicas with it elect one leader")
    peering_priority: int | None = Field(None, description="this replica's priority; default: random per start")
    standalone: bool = Field(False, description="no peering (one replica only; tests)")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    posting_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="min level of k8s Events")
    watch_server_timeout: int = Field(300, gt=0, description="seconds the API server keeps a watch open")
    watch_client_timeout: int = Field(330, gt=0, description="client-side watch timeout")
    # Trainer pools (pool binding): TrainingSessions attach to TrainerPools instead of owning pods.
    pools: bool = Field(True, description="bind TrainingSessions to TrainerPools (many runs share one resident "
                        "base model); false: each session gets a pod set of its own")
    pool_max_runs: int = Field(8, ge=1, le=256, description="maxRuns of the pools the operator creates")
    pool_max_lora_rank: int = Field(512, ge=1, le=512, description="maxLoraRank of the pools the operator creates")
    pool_idle_timeout_seconds: int = Field(300, ge=0, description="an owned pool with no run this long is deleted; "
                                           "0 keeps it")
    pool_sharding: str = Field("replicate", pattern="^(replicate|fsdp)$", description="sharding of created pools")
    pool_sampler: str = Field("hf", pattern="^(hf|vllm)$", description="sampler of created pools")
    share_pools_across_tenants: bool = Field(False, description="runs of different tenants may share a pool")
    max_pools_per_tenant: int = Field(0, ge=0, description="pools one tenant may hold at once; 0: no limit")
    max_runs_per_tenant: int = Field(0, ge=0, description="runs one tenant may have bound at once; 0: no limit")
    warm_pools: dict[str, int] = Field(default_factory=dict, description="JSON {base model: N}: keep N ready, "
                                       "unowned pools of that model (the first tenant to bind claims one)")
    warm_pools_namespace: str | None = Field(None, description="where warm pools live; default: the first of "
                                             "`namespaces`, else 'default'")
    trainer_token: str | None = Field(None, description="the gateway↔trainer token (from the same Secret), to "
                                      "detach runs of deleted TrainingSessions from their pools")
