"""One reconciliation of a pod set (Kubeflow's Reconcile shape): a TrainerPool, or a TrainingSession that
owns its pods (pool binding off). Called by every kopf handler of either kind (`PodSetKind`).

1. read the object; 2. derive the new status from its pods (pure `status.derive`); 3. act on the pod
set (create missing / recreate after a backoff / tear down); 4. write status only if its meaning
changed, with an Event on each phase change. One lock per object serialises handlers and timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from tinkerkube_contract.conditions import ConditionType, Phase, Reason
from tinkerkube_contract.resource import (
    LABEL_POOL,
    LABEL_SESSION,
    PLURAL,
    POOL_PLURAL,
    PodSetSpec,
    PodSetStatus,
    TrainerPoolSpec,
    TrainerPoolStatus,
    TrainingSessionSpec,
    TrainingSessionStatus,
)
from tinkerkube_operator import conditions as cond
from tinkerkube_operator import manifests, metrics, status
from tinkerkube_operator.kube import Kube
from tinkerkube_operator.podview import PodView, observe, parse_time
from tinkerkube_operator.settings import OperatorSettings
from tinkerkube_operator.status import Action, Decision, Observation

EVENT_MESSAGE_LIMIT = 1024
WARNING_PHASES = {Phase.DEGRADED, Phase.FAILED}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PodSetKind:
    """Which custom resource owns a pod set, and how its pods name it."""

    plural: str
    label: str
    spec_type: type[PodSetSpec]
    status_type: type[PodSetStatus]

    def key(self, namespace: str, name: str) -> tuple[str, str]:
        """Lock/backoff key; pools are prefixed so that a pool and a session of one name never collide."""
        return (namespace, name) if self.plural == PLURAL else (namespace, f"{self.plural}/{name}")

    def ref(self, namespace: str, name: str, generation: int = 0) -> manifests.SessionRef:
        return manifests.SessionRef(name, namespace, generation, self.label)


SESSION_PODS = PodSetKind(PLURAL, LABEL_SESSION, TrainingSessionSpec, TrainingSessionStatus)
POOL_PODS = PodSetKind(POOL_PLURAL, LABEL_POOL, TrainerPoolSpec, TrainerPoolStatus)


@dataclass
class Context:
    """Everything handlers need, built once at startup and kept in kopf's memo."""

    settings: OperatorSettings
    kube: Kube
    pod_config: manifests.PodConfig
    policy: status.Policy
    clock: Callable[[], datetime] = utcnow
    locks: defaultdict[tuple[str, str], asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    not_before: dict[tuple[str, str], float] = field(default_factory=dict)  # monotonic backoff deadlines
    phases: metrics.PhaseBook = field(default_factory=metrics.PhaseBook)
    bind_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one binding decision at a time

    @classmethod
    def build(cls, settings: OperatorSettings, kube: Kube) -> Context:
        policy = status.Policy(max_restarts=settings.max_restarts,
                               unschedulable_timeout=settings.unschedulable_timeout_seconds,
                               image_pull_timeout=settings.image_pull_timeout_seconds,
                               cluster_domain=settings.cluster_domain)
        return cls(settings=settings, kube=kube, pod_config=manifests.PodConfig.from_settings(settings), policy=policy)

    def backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_seconds * (2 ** max(attempt - 1, 0)), s.backoff_max_seconds)


async def reconcile(ctx: Context, namespace: str, name: str, pods: Iterable[PodView] | None = None,
                    kind: PodSetKind = SESSION_PODS) -> None:
    metrics.RECONCILES.inc()
    try:
        async with ctx.locks[kind.key(namespace, name)]:
            await _reconcile_locked(ctx, kind, namespace, name, pods)
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise


async def _reconcile_locked(ctx: Context, kind: PodSetKind, namespace: str, name: str,
                            pods: Iterable[PodView] | None) -> None:
    body = await ctx.kube.get_object(kind.plural, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    old = kind.status_type.model_validate(body.get("status") or {})
    try:
        spec = kind.spec_type.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        await _write(ctx, kind, body, old, _invalid(old, str(exc)))
        return
    from_index = pods is not None
    if pods is None:
        pods = [observe(p) for p in await ctx.kube.list_session_pods(namespace, name, kind.label)]
    runs = await bound_runs(ctx, namespace, name) if kind is POOL_PODS else []
    if kind is POOL_PODS:
        metrics.POOL_RUNS.labels(pool=f"{namespace}/{name}").set(len(runs))
    meta = body["metadata"]
    obs = Observation(ref=kind.ref(namespace, name), spec=spec, old=old, pods=list(pods),
                      now=ctx.clock(), generation=meta.get("generation"),
                      created=parse_time(meta.get("creationTimestamp")), runs=runs)
    decision = status.derive(obs, ctx.policy)
    if decision.action == Action.RECREATE and from_index:
        # The watch-fed index may lag (operator start, failover): confirm a failure against the API.
        fresh = [observe(p) for p in await ctx.kube.list_session_pods(namespace, name, kind.label)]
        decision = status.derive(dataclasses.replace(obs, pods=fresh), ctx.policy)
    await _act(ctx, kind, body, spec, decision)
    await _write(ctx, kind, body, old, decision.status)
    if kind is POOL_PODS and cond.is_true(decision.status.conditions, ConditionType.TERMINATED):
        await ctx.kube.delete_pool(namespace, name)  # an idle pool goes (its pods went with the teardown)


async def bound_runs(ctx: Context, namespace: str, pool: str) -> list[str]:
    """The live TrainingSessions whose status names `pool` (what the pool's runs count is)."""
    return [s["metadata"]["name"] for s in await ctx.kube.list_objects(PLURAL, namespace)
            if (s.get("status") or {}).get("pool") == pool and not s["metadata"].get("deletionTimestamp")
            and not status.is_terminal(TrainingSessionStatus.model_validate(s.get("status") or {}))]


async def _act(ctx: Context, kind: PodSetKind, body: dict[str, Any], spec: PodSetSpec, d: Decision) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    doomed = list(d.stale)
    if d.action in (Action.RECREATE, Action.TEARDOWN):
        doomed += list(d.current)
    await asyncio.gather(*(ctx.kube.delete_pod(ns, p.name) for p in doomed if not p.deleting))
    if d.action == Action.RECREATE:
        ctx.not_before[kind.key(ns, name)] = time.monotonic() + ctx.backoff(d.status.restarts)
    elif d.action == Action.TEARDOWN:
        await _teardown(ctx, kind, ns, name)
    elif time.monotonic() >= ctx.not_before.get(kind.key(ns, name), 0.0):
        await _ensure(ctx, kind, body, spec, d)


async def _ensure(ctx: Context, kind: PodSetKind, body: dict[str, Any], spec: PodSetSpec, d: Decision) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    ref = kind.ref(ns, name, d.status.restarts)
    present = {p.rank for p in d.current}
    if len(present) == spec.replicas:
        return
    # After a failure a session's own trainer restores its last durable state, not the original start (a
    # pool's runs are attached again by the gateway, each resuming its own newest checkpoint).
    last = getattr(d.status, "last_checkpoint", None)
    restore = last if d.status.restarts > 0 else None
    service = manifests.headless_service(ref, spec)
    kopf.adopt(service, owner=body)
    await ctx.kube.create_service(service)
    missing = [p for p in manifests.pods(ref, spec, ctx.pod_config, restore_from=restore)
               if int(p["metadata"]["labels"][manifests.LABEL_NODE_RANK]) not in present]
    kopf.adopt(missing, owner=body)
    await asyncio.gather(*(ctx.kube.create_pod(p) for p in missing))


async def _teardown(ctx: Context, kind: PodSetKind, namespace: str, name: str) -> None:
    for pod in await ctx.kube.list_session_pods(namespace, name, kind.label):
        if not pod["metadata"].get("deletionTimestamp"):
            await ctx.kube.delete_pod(namespace, pod["metadata"]["name"])
    await ctx.kube.delete_service(namespace, manifests.service_name(kind.ref(namespace, name)))


async def delete_children(ctx: Context, namespace: str, name: str, kind: PodSetKind = SESSION_PODS) -> None:
    """On deletion: the API server's garbage collector would follow ownerReferences; do it explicitly
    too, so that clusters (and emulators) without a GC end the processes as well."""
    key = kind.key(namespace, name)
    async with ctx.locks[key]:
        await _teardown(ctx, kind, namespace, name)
    ctx.locks.pop(key, None)
    ctx.not_before.pop(key, None)
    if kind is SESSION_PODS:
        ctx.phases.set(key, None)
    else:
        with contextlib.suppress(KeyError):
            metrics.POOL_RUNS.remove(f"{namespace}/{name}")


async def _write(ctx: Context, kind: PodSetKind, body: dict[str, Any], old: PodSetStatus,
                 new: PodSetStatus) -> None:
    meta = body["metadata"]
    if kind is SESSION_PODS:  # the phase gauge counts sessions (pools have their own)
        ctx.phases.set((meta["namespace"], meta["name"]), new.phase)
    if not status.differs(old, new):
        return
    await ctx.kube.patch_object_status(kind.plural, meta["namespace"], meta["name"], status.status_patch(new))
    old_phase, new_phase = status.phase_of(old), status.phase_of(new)
    if old_phase != new_phase or (old.restarts != new.restarts):
        _post_event(body, new, new_phase)
    if new_phase == Phase.READY and old_phase != Phase.READY and new.restarts == 0:
        created = parse_time(meta.get("creationTimestamp"))
        if created is not None:
            metrics.TIME_TO_READY.observe(max((ctx.clock() - created).total_seconds(), 0.0))


def _post_event(body: dict[str, Any], new: PodSetStatus, phase: Phase) -> None:
    kind = {Phase.FAILED: ConditionType.FAILED, Phase.TERMINATED: ConditionType.TERMINATED,
            Phase.DEGRADED: ConditionType.DEGRADED}.get(phase, ConditionType.READY)
    found = cond.find(new.conditions, kind)
    reason = found.reason if found and found.reason else phase.value
    message = f"{phase.value}: {found.message if found else ''}"[:EVENT_MESSAGE_LIMIT]
    kopf.event(body, type="Warning" if phase in WARNING_PHASES else "Normal", reason=reason, message=message)


def _invalid(old: PodSetStatus, message: str) -> PodSetStatus:
    now = status.iso(utcnow())
    conds = cond.set_condition(old.conditions, cond.make(ConditionType.FAILED, True, Reason.INVALID_SPEC,
                                                         message), now=now)
    return old.model_copy(update={"conditions": conds, "phase": Phase.FAILED.value, "endpoint": None})
