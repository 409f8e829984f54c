"""Pure status derivation: (spec, pods, old status, now) → new status + what to do with the pod set.

Conditions are the truth and `phase` follows from them (contract `phase_from`); terminal conditions
stick. `differs` ignores timestamps (KubeRay's InconsistentRayClusterStatus), so the operator writes
status only when its meaning changes. The gateway's subtree (`futures`, `lastCheckpoint`) is never
written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from tinkerkube_contract.conditions import ConditionType, Phase, Reason, phase_from
from tinkerkube_contract.resource import (
    GATEWAY_STATUS_FIELDS,
    TRAINER_PORT,
    Condition,
    Endpoint,
    PodSetSpec,
    PodSetStatus,
    TrainerPoolSpec,
    TrainerPoolStatus,
    TrainingSessionStatus,
)
from tinkerkube_operator import conditions as cond
from tinkerkube_operator.manifests import SessionRef, pod_dns, service_name
from tinkerkube_operator.podview import PodView, parse_time

C = ConditionType


def operator_fields(kind: type[PodSetStatus]) -> tuple[str, ...]:
    """The status keys the operator writes (all but the gateway's subtree)."""
    return tuple(f.alias or n for n, f in kind.model_fields.items() if (f.alias or n) not in GATEWAY_STATUS_FIELDS)


OPERATOR_FIELDS = operator_fields(TrainingSessionStatus)


class Action(StrEnum):
    ENSURE = "ensure"  # create whatever of the current pod set is missing
    RECREATE = "recreate"  # delete the current set; the next generation follows after a backoff
    TEARDOWN = "teardown"  # terminal: delete every pod and the service


@dataclass(frozen=True, slots=True)
class Policy:
    max_restarts: int = 3
    unschedulable_timeout: float = 300.0
    image_pull_timeout: float = 300.0
    cluster_domain: str = "cluster.local"


@dataclass(frozen=True, slots=True)
class Observation:
    ref: SessionRef  # generation ignored: the current one is old.restarts
    spec: PodSetSpec  # a TrainerPoolSpec or a TrainingSessionSpec
    old: PodSetStatus  # of the same kind
    pods: Sequence[PodView]
    now: datetime
    generation: int | None = None  # metadata.generation
    created: datetime | None = None  # metadata.creationTimestamp
    runs: Sequence[str] = ()  # pools: the TrainingSessions bound to it


@dataclass(frozen=True, slots=True)
class Decision:
    status: PodSetStatus
    action: Action
    current: tuple[PodView, ...] = field(default=())  # the live pods of the current generation
    stale: tuple[PodView, ...] = field(default=())  # pods of older generations, to delete


def iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def is_terminal(status: PodSetStatus) -> bool:
    return cond.is_true(status.conditions, C.FAILED) or cond.is_true(status.conditions, C.TERMINATED)


def derive(obs: Observation, policy: Policy) -> Decision:
    old = obs.old
    base = old.model_copy(update={"observed_generation": obs.generation, "world_size": obs.spec.world_size})
    if isinstance(base, TrainerPoolStatus) and isinstance(obs.spec, TrainerPoolSpec):
        base = _pool_runs(base, obs.spec, obs.runs, obs.now)
    if is_terminal(old):
        return Decision(_with_phase(base, pods_exist=False), Action.TEARDOWN)
    current = tuple(sorted((p for p in obs.pods if p.generation == old.restarts and not p.deleting),
                           key=lambda p: p.rank))
    stale = tuple(p for p in obs.pods if p.generation != old.restarts)
    failure = _failure(obs.spec, current, old)
    if failure is not None:
        return _on_failure(base, obs, failure, policy, stale)
    fatal = _impossible(current, obs.now, policy)
    if fatal is not None:
        return Decision(_terminal(base, C.FAILED, *fatal, now=obs.now), Action.TEARDOWN, current, stale)
    if _idle(obs):
        message = (f"no run for {obs.spec.idle_timeout_seconds}s" if isinstance(obs.spec, TrainerPoolSpec)
                   else f"no futures activity for {obs.spec.idle_timeout_seconds}s")
        return Decision(_terminal(base, C.TERMINATED, Reason.IDLE_TIMEOUT, message, now=obs.now),
                        Action.TEARDOWN, current, stale)
    return Decision(_progress(base, obs, current, policy), Action.ENSURE, current, stale)


def _failure(spec: PodSetSpec, current: Sequence[PodView],
             old: TrainingSessionStatus) -> tuple[Reason, str] | None:
    for p in current:
        if p.exited:
            reason = Reason.OOM_KILLED if p.terminated_reason == "OOMKilled" else Reason.POD_FAILED
            detail = f" ({p.terminated_reason})" if p.terminated_reason else ""
            return reason, f"pod {p.name} (rank {p.rank}) exited with code {p.exit_code}{detail}"
    if cond.is_true(old.conditions, C.SCHEDULED) and len(current) < spec.replicas:
        missing = sorted(set(range(spec.replicas)) - {p.rank for p in current})
        return Reason.POD_FAILED, f"pod(s) of rank {missing} disappeared"
    return None


def _on_failure(base: PodSetStatus, obs: Observation, failure: tuple[Reason, str], policy: Policy,
                stale: tuple[PodView, ...]) -> Decision:
    reason, message = failure
    live = tuple(p for p in obs.pods if p.generation == obs.old.restarts and not p.deleting)
    if obs.old.restarts >= policy.max_restarts:
        message = f"{reason}: {message}; gave up after {obs.old.restarts} recreation(s)"
        failed = _terminal(base, C.FAILED, Reason.RETRIES_EXHAUSTED, message, now=obs.now)
        return Decision(failed, Action.TEARDOWN, live, stale)
    now = iso(obs.now)
    conds = cond.set_condition(base.conditions, cond.make(C.DEGRADED, True, reason, message), now=now)
    recreating = f"recreating the pod set (attempt {obs.old.restarts + 1} of {policy.max_restarts})"
    conds = cond.set_condition(conds, cond.make(C.SCHEDULED, False, Reason.RECREATING, recreating), now=now)
    conds = cond.set_condition(conds, cond.make(C.READY, False, Reason.RECREATING, recreating), now=now)
    new = base.model_copy(update={"conditions": conds, "restarts": obs.old.restarts + 1, "endpoint": None})
    return Decision(_with_phase(new, pods_exist=False), Action.RECREATE, live, stale)


def _impossible(current: Sequence[PodView], now: datetime, policy: Policy) -> tuple[Reason, str] | None:
    for p in current:
        age = (now - p.created).total_seconds() if p.created else 0.0
        if p.unschedulable and age >= policy.unschedulable_timeout:
            return Reason.UNSCHEDULABLE, f"pod {p.name} unschedulable for {age:.0f}s: {p.unschedulable}"
        if p.image_pull_failing and age >= policy.image_pull_timeout:
            return Reason.IMAGE_PULL_BACK_OFF, f"pod {p.name}: {p.waiting_reason}: {p.waiting_message or ''}"
    return None


def _pool_runs(base: TrainerPoolStatus, spec: TrainerPoolSpec, runs: Sequence[str],
               now: datetime) -> TrainerPoolStatus:
    idle_since = None if runs else (base.idle_since or iso(now))
    return base.model_copy(update={"runs": sorted(runs), "runs_used": len(runs),
                                   "runs_free": max(spec.max_runs - len(runs), 0), "idle_since": idle_since})


def _idle(obs: Observation) -> bool:
    timeout = obs.spec.idle_timeout_seconds
    if isinstance(obs.spec, TrainerPoolSpec):  # a pool: no run bound for the timeout; warm pools stay
        since = parse_time(getattr(obs.old, "idle_since", None))
        return (timeout > 0 and bool(obs.spec.owner) and not obs.runs and since is not None
                and (obs.now - since).total_seconds() > timeout)
    futures = getattr(obs.old, "futures", None)
    if timeout <= 0 or (futures is not None and futures.pending > 0):
        return False
    ready = cond.find(obs.old.conditions, C.READY)
    marks = [obs.created, parse_time(futures.updated_at if futures else None),
             parse_time(ready.last_transition_time if ready and ready.status == cond.TRUE else None)]
    last = max((m for m in marks if m is not None), default=None)
    return last is not None and (obs.now - last).total_seconds() > timeout


def _progress(base: PodSetStatus, obs: Observation, current: Sequence[PodView],
              policy: Policy) -> PodSetStatus:
    now, n = iso(obs.now), obs.spec.replicas
    complete = len(current) == n
    conds = cond.set_condition(base.conditions, _scheduled(current, n), now=now)
    ready = complete and all(p.phase == "Running" for p in current) and current[0].ready
    if ready:
        conds = cond.set_condition(conds, cond.make(C.READY, True, Reason.TRAINER_READY, "rank 0 is ready"), now=now)
        if cond.find(conds, C.DEGRADED) is not None:
            conds = cond.set_condition(conds, cond.make(C.DEGRADED, False, Reason.TRAINER_READY, "recovered"),
                                       now=now)
    else:
        conds = cond.set_condition(conds, _not_ready(current, n), now=now)
    endpoint = _endpoint(obs.ref, current[0], policy) if ready else None
    new = base.model_copy(update={"conditions": conds, "endpoint": endpoint})
    return _with_phase(new, pods_exist=bool(current))


def _scheduled(current: Sequence[PodView], n: int) -> Condition:
    stuck = next((p for p in current if p.unschedulable), None)
    if stuck is not None:
        return cond.make(C.SCHEDULED, False, Reason.UNSCHEDULABLE, f"pod {stuck.name}: {stuck.unschedulable}")
    placed = sum(p.scheduled for p in current)
    if len(current) == n and placed == n:
        return cond.make(C.SCHEDULED, True, Reason.PODS_CREATED, f"{n} pod(s) scheduled")
    return cond.make(C.SCHEDULED, False, Reason.POD_PENDING, f"{placed}/{n} pod(s) scheduled")


def _not_ready(current: Sequence[PodView], n: int) -> Condition:
    pulling = next((p for p in current if p.image_pull_failing), None)
    if pulling is not None:
        return cond.make(C.READY, False, Reason.IMAGE_PULL_BACK_OFF,
                         f"pod {pulling.name}: {pulling.waiting_reason}: {pulling.waiting_message or ''}")
    if len(current) == n and all(p.scheduled for p in current):
        return cond.make(C.READY, False, Reason.CONTAINER_STARTING, "waiting for rank 0 to become ready")
    return cond.make(C.READY, False, Reason.POD_PENDING, f"{len(current)}/{n} pod(s) exist")


def _endpoint(ref: SessionRef, rank0: PodView, policy: Policy) -> Endpoint:
    gen_ref = SessionRef(ref.name, ref.namespace, rank0.generation, ref.label)
    host = rank0.ip or pod_dns(gen_ref, 0, policy.cluster_domain)
    return Endpoint(url=f"http://{host}:{TRAINER_PORT}", pod_name=rank0.name, service_name=service_name(ref))


def _terminal(base: PodSetStatus, kind: ConditionType, reason: Reason, message: str, *,
              now: datetime) -> PodSetStatus:
    stamp = iso(now)
    conds = cond.set_condition(base.conditions, cond.make(kind, True, reason, message), now=stamp)
    conds = cond.set_condition(conds, cond.make(C.READY, False, reason, message), now=stamp)
    return _with_phase(base.model_copy(update={"conditions": conds, "endpoint": None}), pods_exist=False)


def _with_phase(status: PodSetStatus, *, pods_exist: bool) -> PodSetStatus:
    return status.model_copy(update={"phase": phase_from(status.conditions, pods_exist=pods_exist).value})


def _meaning(status: PodSetStatus) -> dict[str, Any]:
    dumped = operator_view(status)
    for c in dumped.get("conditions") or []:
        c.pop("lastTransitionTime", None)
    return dumped


def operator_view(status: PodSetStatus) -> dict[str, Any]:
    """The operator's subtree of status, as the API sees it."""
    dumped = status.to_k8s()
    return {k: dumped[k] for k in operator_fields(type(status)) if k in dumped}


def differs(old: PodSetStatus, new: PodSetStatus) -> bool:
    return _meaning(old) != _meaning(new)


def status_patch(new: PodSetStatus) -> dict[str, Any]:
    """A merge patch of the operator's fields only: absent ones become null (removed), `futures` untouched."""
    view = operator_view(new)
    return {k: view.get(k) for k in operator_fields(type(new))}


def parse_status(raw: Any) -> TrainingSessionStatus:
    return TrainingSessionStatus.model_validate(raw or {})


def parse_pool_status(raw: Any) -> TrainerPoolStatus:
    return TrainerPoolStatus.model_validate(raw or {})


def phase_of(status: PodSetStatus) -> Phase:
    return Phase(status.phase) if status.phase else Phase.PENDING
