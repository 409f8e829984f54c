"""Pure pool binding: which TrainerPool serves a TrainingSession, what a new pool looks like, and what the
session's status says about its pool. No I/O (the calls are in `binding`).

Binding rule (one decision at a time, under `Context.bind_lock`):
1. a live pool of the session's tenant and base model with a free run slot and a large enough maxLoraRank
   (tenants share pools only under `share_pools_across_tenants`); the fullest one first (packing);
2. else a warm pool (no owner) of that base model, which the session's tenant claims;
3. else a new pool.
A tenant at its run limit (`max_runs_per_tenant`) binds nowhere, and one at its pool limit
(`max_pools_per_tenant`) neither claims nor creates: the session waits (condition Bound=False,
WaitingForCapacity) and the gateway reports `paused_capacity` on the run's futures.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tinkerkube_contract.conditions import ConditionType, Phase, Reason, phase_from
from tinkerkube_contract.resource import (
    API_VERSION,
    LABEL_BASE_MODEL,
    LABEL_TENANT,
    POOL_KIND,
    Sampler,
    Sharding,
    TrainerPoolSpec,
    TrainerPoolStatus,
    TrainingSessionSpec,
    TrainingSessionStatus,
    label_value,
)
from tinkerkube_operator import conditions as cond
from tinkerkube_operator.settings import OperatorSettings

C = ConditionType
POOL_NAME_MAX = 50  # pods are `<pool>-g<generation>-<rank>`: they must stay ≤ 63 characters
WARM_PREFIX = "warm"


class Choice(StrEnum):
    USE = "use"  # a pool of this tenant with room
    CLAIM = "claim"  # a warm pool: set its owner
    CREATE = "create"
    WAIT = "wait"  # limits reached: no pool may be created now


@dataclass(frozen=True, slots=True)
class Binding:
    choice: Choice
    pool: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PoolView:
    """What binding needs to know of one TrainerPool."""

    name: str
    spec: TrainerPoolSpec
    phase: str | None
    deleting: bool = False

    @property
    def live(self) -> bool:
        return not self.deleting and self.phase not in (Phase.FAILED.value, Phase.TERMINATED.value)


def view(body: Mapping[str, Any]) -> PoolView:
    meta = body.get("metadata") or {}
    return PoolView(name=meta.get("name", ""), spec=TrainerPoolSpec.model_validate(body.get("spec") or {}),
                    phase=(body.get("status") or {}).get("phase"), deleting=bool(meta.get("deletionTimestamp")))


def choose(spec: TrainingSessionSpec, pools: Sequence[PoolView], used: Mapping[str, int],
           settings: OperatorSettings) -> Binding:
    """`used`: pool name → live sessions bound to it (this one excluded)."""
    share = settings.share_pools_across_tenants
    mine = [p for p in pools if p.live and p.spec.owner == spec.owner]
    runs = sum(used.get(p.name, 0) for p in mine)
    if settings.max_runs_per_tenant and runs >= settings.max_runs_per_tenant:
        return Binding(Choice.WAIT, reason=f"tenant {spec.owner!r} has {runs} run(s), its limit "
                       f"(max_runs_per_tenant); waiting for one to end")
    fits = [p for p in pools
            if p.live and p.spec.base_model == spec.base_model and spec.lora.rank <= p.spec.max_lora_rank]
    own = [p for p in fits if p.spec.owner and (p.spec.owner == spec.owner or share)
           and used.get(p.name, 0) < p.spec.max_runs]
    if own:
        best = max(own, key=lambda p: (p.phase == Phase.READY.value, used.get(p.name, 0), p.name))
        return Binding(Choice.USE, best.name)
    if settings.max_pools_per_tenant and len(mine) >= settings.max_pools_per_tenant:
        return Binding(Choice.WAIT, reason=f"tenant {spec.owner!r} holds {len(mine)} pool(s), its limit "
                       f"(max_pools_per_tenant); waiting for a run slot to free up")
    warm = sorted((p for p in fits if not p.spec.owner and used.get(p.name, 0) == 0),
                  key=lambda p: (p.phase != Phase.READY.value, p.name))
    if warm:
        return Binding(Choice.CLAIM, warm[0].name)
    return Binding(Choice.CREATE, new_pool_name(spec.owner, spec.base_model))


def _slug(value: str, size: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")[:size].strip("-") or "x"


def new_pool_name(tenant: str, base_model: str) -> str:
    """`pool-<tenant>-<model>-<random>`: unique, ≤ POOL_NAME_MAX, an RFC 1035 label."""
    model = _slug(base_model.rsplit("/", 1)[-1], 16)
    head = f"pool-{_slug(tenant, 14)}-{model}"
    return f"{head[:POOL_NAME_MAX - 7].rstrip('-')}-{secrets.token_hex(3)}"


def warm_pool_name(base_model: str, index: int) -> str:
    """Deterministic, so that two operator replicas refilling at once create one pool, not two (409)."""
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:6]
    return f"{WARM_PREFIX}-{_slug(base_model.rsplit('/', 1)[-1], 24)}-{digest}-{index}"


def pool_spec(base: TrainingSessionSpec | None, settings: OperatorSettings, *, base_model: str,
              owner: str) -> TrainerPoolSpec:
    """A new pool: the session's placement (replicas, resources, image, scheduling, checkpoint store) and the
    operator's pool settings; a warm pool (no session) takes the operator's defaults."""
    placement: dict[str, Any] = {}
    if base is not None:
        placement = base.model_dump(include={"replicas", "procs_per_pod", "resources", "image", "node_selector",
                                             "tolerations", "affinity", "priority_class_name", "checkpoint_store"})
    return TrainerPoolSpec(base_model=base_model, owner=owner, max_runs=settings.pool_max_runs,
                           max_lora_rank=settings.pool_max_lora_rank,
                           idle_timeout_seconds=settings.pool_idle_timeout_seconds,
                           sharding=Sharding(settings.pool_sharding), sampler=Sampler(settings.pool_sampler),
                           **placement)


def pool_body(name: str, namespace: str, spec: TrainerPoolSpec) -> dict[str, Any]:
    labels = {LABEL_TENANT: label_value(spec.owner), LABEL_BASE_MODEL: label_value(spec.base_model)}
    return {"apiVersion": API_VERSION, "kind": POOL_KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec.to_k8s()}


def warm_missing(pools: Sequence[PoolView], wanted: Mapping[str, int]) -> list[tuple[str, str]]:
    """(base model, pool name) of the warm pools to create so that each model has its N unowned ones."""
    out: list[tuple[str, str]] = []
    taken = {p.name for p in pools}
    for model, n in sorted(wanted.items()):
        have = sum(1 for p in pools if p.live and not p.spec.owner and p.spec.base_model == model)
        index = 0
        for _ in range(max(n - have, 0)):
            while warm_pool_name(model, index) in taken:
                index += 1
            name = warm_pool_name(model, index)
            taken.add(name)
            out.append((model, name))
    return out


def bound_status(old: TrainingSessionStatus, pool: str | None, pool_status: TrainerPoolStatus | None, *,
                 now: str, waiting: str | None = None, lost: str | None = None) -> TrainingSessionStatus:
    """The session's status under pool binding: Bound, and the pool's Scheduled/Ready/Degraded/Failed seen
    from the run's side (its endpoint is the pool's). `lost`: the pool it was bound to went away."""
    conds = list(old.conditions)
    if pool is None:
        conds = cond.set_condition(conds, cond.make(C.BOUND, False, Reason.WAITING_FOR_CAPACITY,
                                                    waiting or "waiting for a pool"), now=now)
        conds = cond.set_condition(conds, cond.make(C.READY, False, Reason.WAITING_FOR_CAPACITY,
                                                    waiting or "waiting for a pool"), now=now)
        new = old.model_copy(update={"conditions": conds, "pool": None, "endpoint": None})
        return new.model_copy(update={"phase": phase_from(conds, pods_exist=False).value})
    conds = cond.set_condition(conds, cond.make(C.BOUND, True, Reason.POOL_BOUND, f"served by TrainerPool {pool}"),
                               now=now)
    ps = pool_status or TrainerPoolStatus()
    for kind in (C.SCHEDULED, C.FAILED):
        found = cond.find(ps.conditions, kind)
        if found is not None:
            conds = cond.set_condition(conds, cond.make(kind, found.status, found.reason,
                                                        f"pool {pool}: {found.message}"), now=now)
    ready = cond.is_true(ps.conditions, C.READY) and ps.endpoint is not None
    if ready:
        conds = cond.set_condition(conds, cond.make(C.READY, True, Reason.TRAINER_READY, f"pool {pool} is ready"),
                                   now=now)
    else:
        found = cond.find(ps.conditions, C.READY)
        why = f"pool {pool}: {found.message}" if found is not None else f"pool {pool} is starting"
        conds = cond.set_condition(conds, cond.make(C.READY, False, found.reason if found else Reason.POOL_NOT_READY,
                                                    why), now=now)
    if lost:
        conds = cond.set_condition(conds, cond.make(C.DEGRADED, True, Reason.POOL_LOST, lost), now=now)
    elif cond.is_true(ps.conditions, C.DEGRADED):
        found = cond.find(ps.conditions, C.DEGRADED)
        assert found is not None
        conds = cond.set_condition(conds, cond.make(C.DEGRADED, True, found.reason, f"pool {pool}: {found.message}"),
                                   now=now)
    elif ready and cond.is_true(conds, C.DEGRADED):
        conds = cond.set_condition(conds, cond.make(C.DEGRADED, False, Reason.TRAINER_READY, "recovered"), now=now)
    new = old.model_copy(update={"conditions": conds, "pool": pool, "world_size": ps.world_size,
                                 "endpoint": ps.endpoint if ready else None})
    exist = cond.is_true(conds, C.SCHEDULED)
    return new.model_copy(update={"phase": phase_from(conds, pods_exist=exist).value})
