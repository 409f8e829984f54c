"""KubernetesBackend: one TrainingSession custom resource per training run / started sampler.

The operator either turns each resource into trainer pods of its own, or (pool binding) binds it to a
TrainerPool; either way it reports `status.phase` and `status.endpoint`. Under pool binding
(`status.pool` set) this backend then attaches the run to the pool over the pod API (`attach.attach_run`,
the local backend's own code), and attaches it again whenever the pool at its endpoint does not hold it
(the pool's pods were recreated, or the run was bound to another pool): the worker sees a new boot id and
replays the run's ops from the op log. While the operator says the run waits for capacity, its futures
report `paused_capacity` (`capacity_wait`) and the start timeout does not run.
This backend only creates, reads, deletes and status-patches TrainingSessions (in threads, with the
official `kubernetes` client). Kubernetes API calls made here (RBAC derives from this list):
  tinkerkube.dev trainingsessions: create, get, delete;  trainingsessions/status: patch.

Futures are mirrored into `status.futures` through a `Coalescer` (status_writes.py): at most one write per
session per `status_interval` seconds, whatever the call rate; the last value always gets written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from tinkerkube_contract.conditions import ConditionType, Phase, Reason
from tinkerkube_contract.resource import (
    ANNOTATION_MODEL_ID,
    API_VERSION,
    GROUP,
    KIND,
    LABEL_TENANT,
    LABEL_TINKER_SESSION,
    PLURAL,
    VERSION,
    CheckpointStore,
    FuturesStatus,
    TrainingSessionSpec,
    label_value,
)
from tinkerkube_gateway.backends.attach import attach_run
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.backends.status_writes import Coalescer
from tinkerkube_gateway.clients.pod_client import OpRejected, PodClient, TrainerUnreachable

log = logging.getLogger(__name__)
TERMINAL = {Phase.FAILED.value, Phase.TERMINATED.value}
RECOVERING = {Phase.PENDING.value, Phase.STARTING.value, Phase.DEGRADED.value}


def resource_name(model_id: str) -> str:
    """A DNS-safe (RFC 1035) name of ≤63 characters, unique per model id thanks to a hash suffix;
    the real id travels in the `tinkerkube.dev/model-id` annotation."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_id.lower()).strip("-")
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:8]
    head = f"ts-{slug}"[: 63 - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def api_client(api_url: str | None, kubeconfig: str | None) -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration()
    if api_url:
        config.host = api_url.rstrip("/")
    elif kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
    config.connection_pool_maxsize = 16
    return kubernetes.client.ApiClient(config)


@dataclass(frozen=True, slots=True)
class Placement:
    """What the gateway's deployment decides for every session's pods (the core knows nothing of pods);
    None keeps what the spec says."""

    image: str | None = None
    replicas: int | None = None
    procs_per_pod: int | None = None
    gpus: int | None = None
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    priority_class_name: str | None = None
    checkpoint_pvc: str | None = None
    checkpoint_host_path: str | None = None
    checkpoint_mount_path: str = "/checkpoints"
    idle_timeout_seconds: int | None = None

    def apply(self, spec: TrainingSessionSpec) -> TrainingSessionSpec:
        plain = {"image": self.image, "replicas": self.replicas, "procs_per_pod": self.procs_per_pod,
                 "node_selector": self.node_selector or None, "tolerations": self.tolerations or None,
                 "priority_class_name": self.priority_class_name, "idle_timeout_seconds": self.idle_timeout_seconds}
        update: dict[str, Any] = {k: v for k, v in plain.items() if v is not None}
        res = {"gpus": self.gpus, "cpu": self.cpu, "memory": self.memory}
        if any(v is not None for v in res.values()):
            update["resources"] = spec.resources.model_copy(update={k: v for k, v in res.items() if v is not None})
        if self.checkpoint_pvc or self.checkpoint_host_path:
            update["checkpoint_store"] = CheckpointStore(pvc_name=self.checkpoint_pvc,
                                                         host_path=self.checkpoint_host_path,
                                                         mount_path=self.checkpoint_mount_path)
        return spec.model_copy(update=update)


# from_settings: the backend's argument ← the gateway settings attribute read when no `kube_<arg>` exists.
_SETTINGS_FALLBACKS = {"trainer_image": "trainer_image", "replicas": "trainer_replicas", "gpus": "trainer_gpus",
                       "cpu": "trainer_cpu", "memory": "trainer_memory", "node_selector": "trainer_node_selector",
                       "tolerations": "trainer_tolerations", "priority_class_name": "trainer_priority_class_name",
                       "procs_per_pod": "trainer_nproc_per_node"}
_SETTINGS_NAMES = ("namespace", "api_url", "kubeconfig", "token", "trainer_image", "checkpoint_pvc",
                   "checkpoint_host_path", "checkpoint_mount_path", "replicas", "procs_per_pod", "gpus", "cpu",
                   "memory", "node_selector", "tolerations", "priority_class_name", "idle_timeout_seconds",
                   "status_interval_seconds", "recover_timeout_seconds", "delete_on_close")


class KubernetesBackend:
    def __init__(self, *, namespace: str = "default", api_url: str | None = None, kubeconfig: str | None = None,
                 token: str | None = None, trainer_image: str | None = None, checkpoint_pvc: str | None = None,
                 checkpoint_host_path: str | None = None, checkpoint_mount_path: str = "/checkpoints",
                 replicas: int | None = None, procs_per_pod: int | None = None, gpus: int | None = None,
                 cpu: str | None = None, memory: str | None = None, node_selector: dict[str, str] | None = None,
                 tolerations: list[dict[str, Any]] | None = None, priority_class_name: str | None = None,
                 idle_timeout_seconds: int | None = None, status_interval_seconds: float = 1.0,
                 poll_interval_seconds: float = 0.5, recover_timeout_seconds: float = 600.0,
                 delete_on_close: bool = False, client: kubernetes.client.ApiClient | None = None,
                 pods: PodClient | None = None) -> None:
        self.namespace, self.token = namespace, token
        self._pods = pods
        self._client = client or api_client(api_url, kubeconfig)
        self._api = kubernetes.client.CustomObjectsApi(self._client)
        self.placement = Placement(
            image=trainer_image, replicas=replicas, procs_per_pod=procs_per_pod, gpus=gpus, cpu=cpu, memory=memory,
            node_selector=node_selector, tolerations=tolerations, priority_class_name=priority_class_name,
            checkpoint_pvc=checkpoint_pvc, checkpoint_host_path=checkpoint_host_path,
            checkpoint_mount_path=checkpoint_mount_path, idle_timeout_seconds=idle_timeout_seconds)
        self._poll, self._recover_timeout = poll_interval_seconds, recover_timeout_seconds
        self._delete_on_close = delete_on_close
        self._started: set[str] = set()
        self._reasons: dict[str, str] = {}
        self._waiting: dict[str, str] = {}  # model_id → why it waits for capacity (the operator's words)
        self.coalescer = Coalescer(self._write_futures, status_interval_seconds)

    @classmethod
    def from_settings(cls, settings: Any, pods: PodClient | None = None) -> KubernetesBackend:
        """From the gateway's settings object: `kube_<arg>` for each constructor argument it has, else the
        gateway's own `trainer_*` names (see _SETTINGS_FALLBACKS); absent or None keeps the default."""
        kwargs: dict[str, Any] = {"pods": pods}
        for name in _SETTINGS_NAMES:
            value = getattr(settings, f"kube_{name}", None)
            if value is None and name in _SETTINGS_FALLBACKS:
                value = getattr(settings, _SETTINGS_FALLBACKS[name], None)
            if value is not None:
                kwargs[name] = value
        return cls(**kwargs)

    # --- SessionBackend --------------------------------------------------------------------------
    async def start(self, spec: TrainingSessionSpec) -> None:
        body = self.render(spec)
        name = body["metadata"]["name"]
        existing = await self._get(name)
        if existing is not None and _phase(existing) in TERMINAL:  # a dead earlier life: start afresh
            await self._delete_and_wait(name)
            existing = None
        if existing is None:
            await self._wait_gone(name)  # an earlier life may still be finalizing
            try:
                await asyncio.to_thread(self._api.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                        PLURAL, body, _preload_content=False)
            except ApiException as exc:
                if exc.status != 409:
                    raise TrainerStartFailed(f"cannot create TrainingSession {name}: {exc.reason}") from exc
        self._started.add(spec.model_id)

    def render(self, spec: TrainingSessionSpec) -> dict[str, Any]:
        effective = self.placement.apply(spec)
        labels = {LABEL_TENANT: label_value(spec.owner)}
        if spec.tinker_session:
            labels[LABEL_TINKER_SESSION] = label_value(spec.tinker_session)
        return {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": resource_name(spec.model_id), "namespace": self.namespace, "labels": labels,
                             "annotations": {ANNOTATION_MODEL_ID: spec.model_id}},
                "spec": effective.to_k8s()}

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            last = await self._get(resource_name(model_id))
            if last is None:
                self._waiting.pop(model_id, None)
                raise TrainerStartFailed(f"TrainingSession for {model_id} does not exist (deleted?)")
            waiting = _capacity_wait(last)
            if waiting is not None:  # the operator holds it until room appears: that is no start failure
                self._waiting[model_id] = waiting
                deadline = max(deadline, time.monotonic() + timeout)
            else:
                self._waiting.pop(model_id, None)
            handle = self._handle_of(last)
            if handle is not None:
                with contextlib.suppress(TrainerUnreachable):  # a pool pod going away: wait for the next
                    await self._attached(last, handle, deadline)
                    return handle
            if _phase(last) in TERMINAL:
                raise TrainerStartFailed(self._remember(model_id, last), retryable=False)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(self._poll, max(deadline - time.monotonic(), 0.01)))
        scheduled = _condition(last, ConditionType.SCHEDULED)
        if scheduled and scheduled.get("reason") == Reason.UNSCHEDULABLE:
            raise TrainerStartFailed(f"Unschedulable: {scheduled.get('message', '')}", retryable=True)
        raise TimeoutError(f"trainer for {model_id} not ready within {timeout:.0f}s (phase {_phase(last)})")

    async def handle(self, model_id: str) -> TrainerHandle | None:
        """Ready: its endpoint. Being (re)created by the operator: wait for it. Gone or terminal: None."""
        body = await self._get(resource_name(model_id))
        if body is None:
            return None
        if _phase(body) in RECOVERING or (_phase(body) == Phase.READY.value and self._handle_of(body) is None):
            with contextlib.suppress(TrainerStartFailed, TimeoutError):
                return await self.wait_ready(model_id, self._recover_timeout)
            return None
        if _phase(body) in TERMINAL:
            self._remember(model_id, body)
        handle = self._handle_of(body)
        if handle is not None:
            try:
                await self._attached(body, handle, time.monotonic() + self._recover_timeout)
            except (TrainerStartFailed, TimeoutError) as exc:
                log.error("could not attach %s to its pool again: %s", model_id, exc)
                return None
            except TrainerUnreachable:
                pass  # the worker asks again
        return handle

    def capacity_wait(self, model_id: str) -> str | None:
        """Why this run waits for capacity (no pool may be created, or its pool cannot be scheduled), or None."""
        return self._waiting.get(model_id)

    async def _attached(self, body: dict[str, Any], handle: TrainerHandle, deadline: float) -> None:
        """Under pool binding: make sure the pool at `handle` holds the run (attach it when it does not:
        a pool that was recreated or replaced has lost it). A session with pods of its own attached its
        run at boot."""
        pool = (body.get("status") or {}).get("pool")
        if not pool or self._pods is None:
            return
        spec = TrainingSessionSpec.model_validate(body.get("spec") or {})
        try:
            await self._pods.info(handle, spec.model_id)
            return
        except OpRejected as exc:
            if exc.status != 404:
                raise TrainerStartFailed(f"TrainerPool {pool} refused {spec.model_id}: {exc.detail}") from exc
        await attach_run(self._pods, handle, spec, deadline, where=f"TrainerPool {pool}")

    def exit_reason(self, model_id: str) -> str:
        return self._reasons.get(model_id, "the TrainingSession is gone")

    async def stop(self, model_id: str) -> None:
        """Deletes the TrainingSession; under pool binding the operator detaches the run from its pool."""
        self.coalescer.forget(model_id)
        self._started.discard(model_id)
        self._waiting.pop(model_id, None)
        with contextlib.suppress(ApiException):
            await self._delete(resource_name(model_id))

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        self.coalescer.offer(model_id, futures)

    async def mirror_checkpoint(self, model_id: str, tinker_path: str) -> None:
        """status.lastCheckpoint: the operator restores a recreated pod set from it (rare; not coalesced)."""
        await self._patch_status(model_id, {"lastCheckpoint": tinker_path})

    async def close(self) -> None:
        """Flush pending mirrors. TrainingSessions outlive a gateway replica (others may serve them)
        unless `delete_on_close`."""
        await self.coalescer.flush()
        if self._delete_on_close:
            for model_id in list(self._started):
                await self.stop(model_id)
        await asyncio.to_thread(self._client.close)

    # --- helpers --------------------------------------------------------------------------------
    async def _write_futures(self, model_id: str, futures: FuturesStatus) -> None:
        if futures.updated_at is None:  # the operator's idle reaper reads activity from it
            futures = futures.model_copy(update={"updated_at": _utcnow()})
        await self._patch_status(model_id, {"futures": futures.to_k8s()})

    async def _patch_status(self, model_id: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(_NotFound):
            await self._call(self._api.patch_namespaced_custom_object_status, resource_name(model_id),
                             {"status": status})

    def _handle_of(self, body: dict[str, Any]) -> TrainerHandle | None:
        status = body.get("status") or {}
        endpoint = (status.get("endpoint") or {}).get("url")
        if status.get("phase") == Phase.READY.value and endpoint:
            return TrainerHandle(url=endpoint, token=self.token)
        return None

    def _remember(self, model_id: str, body: dict[str, Any]) -> str:
        cond = _condition(body, ConditionType.FAILED) or _condition(body, ConditionType.TERMINATED) or {}
        reason = f"{_phase(body)}: {cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
        self._reasons[model_id] = reason
        return reason

    async def _get(self, name: str) -> dict[str, Any] | None:
        """The resource, or None when it is absent or being deleted (finalizers still running)."""
        try:
            resp = await self._call(self._api.get_namespaced_custom_object, name)
        except _NotFound:
            return None
        return None if (resp or {}).get("metadata", {}).get("deletionTimestamp") else resp

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(_NotFound):
            await self._call(self._api.delete_namespaced_custom_object, name)

    async def _delete_and_wait(self, name: str) -> None:
        await self._delete(name)
        await self._wait_gone(name)

    async def _wait_gone(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self._call(self._api.get_namespaced_custom_object, name)
            except _NotFound:
                return
            await asyncio.sleep(self._poll)

    async def _call(self, fn: Callable[..., Any], name: str, *body: Any) -> Any:
        def call() -> Any:
            resp = fn(GROUP, VERSION, self.namespace, PLURAL, name, *body, _preload_content=False)
            return json.loads(resp.data) if resp.data else None
        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status == 404:
                raise _NotFound(name) from exc
            raise


class _NotFound(Exception):
    pass


def _utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _phase(body: dict[str, Any] | None) -> str | None:
    return ((body or {}).get("status") or {}).get("phase")


def _capacity_wait(body: dict[str, Any]) -> str | None:
    """The operator's reason when the run waits for room: unbound (limits), or its pool's pods unschedulable."""
    bound = _condition(body, ConditionType.BOUND)
    if bound is not None and bound.get("status") == "False" and bound.get("reason") == Reason.WAITING_FOR_CAPACITY:
        return str(bound.get("message") or "waiting for capacity")
    scheduled = _condition(body, ConditionType.SCHEDULED)
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == Reason.UNSCHEDULABLE:
        return str(scheduled.get("message") or "the trainer's pods cannot be scheduled yet")
    return None


def _condition(body: dict[str, Any] | None, kind: ConditionType) -> dict[str, Any] | None:
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), None)
