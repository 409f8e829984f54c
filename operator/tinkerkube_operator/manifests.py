"""Pure rendering: a pod-set spec (a TrainerPool's, or a TrainingSession's when sessions own their pods)
→ its Pods (one per replica) and its headless Service.

Imports neither kopf nor kubernetes (like KubeRay's common/pod.go). Every pod runs the one torchrun
command of `tinkerkube_contract.launch`; the env comes from `launch.pool_env` (a pool, runs attach over
the pod API) or `launch.trainer_env` (a session's own pod set, its run attached at boot), never a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinkerkube_contract import env, launch, pod_api
from tinkerkube_contract.resource import (
    LABEL_GENERATION,
    LABEL_NODE_RANK,
    LABEL_POOL,
    LABEL_ROLE,
    LABEL_SESSION,
    LABEL_TENANT,
    LABEL_TINKER_SESSION,
    RENDEZVOUS_PORT,
    TRAINER_PORT,
    PodSetSpec,
    TrainerPoolSpec,
    TrainingSessionSpec,
    label_value,
)
from tinkerkube_operator.settings import OperatorSettings

ROLE_TRAINER = "trainer"
CONTAINER = "trainer"
CHECKPOINT_VOLUME = "checkpoints"
MODEL_CACHE_VOLUME = "model-cache"
SHM_VOLUME = "dshm"
TMP_VOLUME = "tmp"  # the root filesystem is read-only: torchrun and torch need a writable /tmp
GPU_RESOURCE = "nvidia.com/gpu"

@dataclass(frozen=True, slots=True)
class PodConfig:
    """Operator-wide pod defaults (from OperatorSettings)."""

    image: str
    python: str = "python"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    token_secret: str | None = None
    token_secret_key: str = "token"
    checkpoint_pvc: str | None = None
    checkpoint_host_path: str | None = None
    model_cache_dir: str | None = None
    model_cache_pvc: str | None = None
    cluster_domain: str = "cluster.local"
    run_as_user: int = 10001
    shm_size: str = "1Gi"

    @classmethod
    def from_settings(cls, s: OperatorSettings) -> PodConfig:
        return cls(image=s.trainer_image, python=s.trainer_python, image_pull_policy=s.image_pull_policy,
                   service_account=s.service_account, token_secret=s.auth_token_secret,
                   token_secret_key=s.auth_token_secret_key, checkpoint_pvc=s.checkpoint_pvc,
                   checkpoint_host_path=s.checkpoint_host_path, model_cache_dir=s.model_cache_dir,
                   model_cache_pvc=s.model_cache_pvc, cluster_domain=s.cluster_domain,
                   run_as_user=s.trainer_run_as_user, shm_size=s.trainer_shm_size)


@dataclass(frozen=True, slots=True)
class SessionRef:
    """Which object (TrainingSession or TrainerPool) the pods belong to, and which pod-set generation."""

    name: str
    namespace: str
    generation: int = 0  # == status.restarts: bumps each time the pod set is recreated
    label: str = LABEL_SESSION  # the label naming the owner on its pods: LABEL_SESSION or LABEL_POOL


def pool_ref(name: str, namespace: str, generation: int = 0) -> SessionRef:
    return SessionRef(name, namespace, generation, LABEL_POOL)


def service_name(ref: SessionRef) -> str:
    return ref.name  # CEL keeps session names RFC 1035 labels of ≤63 characters


def pod_name(ref: SessionRef, rank: int) -> str:
    return f"{ref.name}-g{ref.generation}-{rank}"


def pod_hostname(ref: SessionRef, rank: int) -> str:
    return f"g{ref.generation}-r{rank}"


def pod_dns(ref: SessionRef, rank: int, cluster_domain: str) -> str:
    return f"{pod_hostname(ref, rank)}.{service_name(ref)}.{ref.namespace}.svc.{cluster_domain}"


def selector_labels(ref: SessionRef) -> dict[str, str]:
    return {ref.label: ref.name, LABEL_ROLE: ROLE_TRAINER}


def session_labels(ref: SessionRef, spec: PodSetSpec) -> dict[str, str]:
    labels = {**selector_labels(ref), LABEL_TENANT: label_value(getattr(spec, "owner", ""))}
    tinker_session = getattr(spec, "tinker_session", None)
    if tinker_session:
        labels[LABEL_TINKER_SESSION] = label_value(tinker_session)
    return labels


def headless_service(ref: SessionRef, spec: PodSetSpec) -> dict[str, Any]:
    """DNS names for every pod (the rendezvous address of rank 0), published before readiness because
    the ranks must find each other before the trainer can become ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(ref), "namespace": ref.namespace, "labels": session_labels(ref, spec)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(ref),
            "ports": [
                {"name": "trainer", "port": TRAINER_PORT, "targetPort": TRAINER_PORT},
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT},
            ],
        },
    }


def pods(ref: SessionRef, spec: PodSetSpec, cfg: PodConfig, *,
         restore_from: str | None = None) -> list[dict[str, Any]]:
    """One Pod per replica. `restore_from` overrides spec.restoreFrom when recreating after a failure."""
    return [pod(ref, spec, cfg, rank, restore_from=restore_from) for rank in range(spec.replicas)]


def pod(ref: SessionRef, spec: PodSetSpec, cfg: PodConfig, rank: int, *,
        restore_from: str | None = None) -> dict[str, Any]:
    labels = {**session_labels(ref, spec), LABEL_NODE_RANK: str(rank), LABEL_GENERATION: str(ref.generation)}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # any rank failing fails the set as a unit; the operator recreates it
        "hostname": pod_hostname(ref, rank),
        "subdomain": service_name(ref),
        "containers": [_container(ref, spec, cfg, rank, restore_from)],
        "volumes": _volumes(spec, cfg),
        "terminationGracePeriodSeconds": 30,
        # fsGroup makes a freshly provisioned checkpoint volume writable by the non-root trainer user.
        "securityContext": {"runAsNonRoot": True, "runAsUser": cfg.run_as_user, "runAsGroup": cfg.run_as_user,
                            "fsGroup": cfg.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if cfg.service_account:
        pod_spec["serviceAccountName"] = cfg.service_account
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(ref, rank), "namespace": ref.namespace, "labels": labels},
        "spec": pod_spec,
    }


def _container(ref: SessionRef, spec: PodSetSpec, cfg: PodConfig, rank: int,
               restore_from: str | None) -> dict[str, Any]:
    argv = launch.torchrun_argv(
        nnodes=spec.replicas, nproc_per_node=spec.procs_per_pod, node_rank=rank,
        master_addr=pod_dns(ref, 0, cfg.cluster_domain), master_port=RENDEZVOUS_PORT, python=cfg.python,
    )
    return {
        "name": CONTAINER,
        "image": spec.image or cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": argv,
        "env": _env(ref, spec, cfg, restore_from),
        "ports": [{"name": "trainer", "containerPort": TRAINER_PORT},
                  {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec, cfg),
        "readinessProbe": _probe(pod_api.READY_PATH, period=5, failures=3),
        "livenessProbe": _probe(pod_api.HEALTH_PATH, period=10, failures=6),
        # Model loading may take minutes; liveness only counts once the server has answered.
        "startupProbe": _probe(pod_api.HEALTH_PATH, period=5, failures=180),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }


def launch_env(ref: SessionRef, spec: PodSetSpec, cfg: PodConfig, restore_from: str | None = None) -> dict[str, str]:
    """A pool's env (no run: runs attach over the pod API), or a session's own pod set (its run at boot).

    A pool's pass journal (poison ops, trainer pass_journal.py) is named by the pool, not its pods: a pod
    that replaces a dead one must read what its predecessor left. A session's own pods name theirs by run."""
    mount = spec.checkpoint_store.mount_path
    common: dict[str, Any] = {"checkpoint_dir": mount, "port": TRAINER_PORT, "model_cache_dir": cfg.model_cache_dir,
                              "device": "cuda" if spec.resources.gpus > 0 else "auto"}
    if isinstance(spec, TrainerPoolSpec):
        return launch.pool_env(spec.base_model, max_runs=spec.max_runs, max_lora_rank=spec.max_lora_rank,
                               sharding=spec.sharding.value, sampler=spec.sampler.value,
                               pass_journal=f"{mount.rstrip('/')}/.pass-journal/pool-{ref.namespace}-{ref.name}.json",
                               **common)
    assert isinstance(spec, TrainingSessionSpec)
    effective = spec.model_copy(update={"restore_from": restore_from}) if restore_from else spec
    return launch.trainer_env(effective, **common)


def _env(ref: SessionRef, spec: PodSetSpec, cfg: PodConfig, restore_from: str | None) -> list[dict[str, Any]]:
    values = launch_env(ref, spec, cfg, restore_from)
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(values.items())]
    if cfg.token_secret:
        out.append({"name": env.AUTH_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": cfg.token_secret, "key": cfg.token_secret_key, "optional": False}}})
    return out


def _resources(spec: PodSetSpec) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    if spec.resources.gpus > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(spec.resources.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(spec: PodSetSpec, cfg: PodConfig) -> list[dict[str, Any]]:
    store = spec.checkpoint_store
    pvc = store.pvc_name or (None if store.host_path else cfg.checkpoint_pvc)
    host = store.host_path or (None if store.pvc_name else cfg.checkpoint_host_path)
    if pvc:
        ckpt: dict[str, Any] = {"persistentVolumeClaim": {"claimName": pvc}}
    elif host:
        ckpt = {"hostPath": {"path": host, "type": "DirectoryOrCreate"}}
    else:
        ckpt = {"emptyDir": {}}  # checkpoints die with the pod: fine for throwaway runs only
    volumes = [{"name": CHECKPOINT_VOLUME, **ckpt}, {"name": TMP_VOLUME, "emptyDir": {}}]
    if cfg.model_cache_pvc and cfg.model_cache_dir:
        volumes.append({"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cfg.model_cache_pvc}})
    if cfg.shm_size:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}})
    return volumes


def _mounts(spec: PodSetSpec, cfg: PodConfig) -> list[dict[str, Any]]:
    mounts = [{"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint_store.mount_path},
              {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    if cfg.model_cache_pvc and cfg.model_cache_dir:
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": cfg.model_cache_dir})
    if cfg.shm_size:
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return mounts


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": TRAINER_PORT}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": 5}
