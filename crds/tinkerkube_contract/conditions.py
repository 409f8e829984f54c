"""Condition types, reasons and phases of a TrainingSession, and the one rule deriving phase.

Conditions are the truth; `phase` is a summary derived from them (KubeRay/Kubeflow convention) so a
printer column can show it. Terminal phases are sticky: nothing brings a session back.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    TERMINATED = "Terminated"


TERMINAL_PHASES = frozenset({Phase.FAILED, Phase.TERMINATED})


class ConditionType(StrEnum):
    BOUND = "Bound"  # TrainingSessions under pool binding: a TrainerPool serves the run (status.pool)
    SCHEDULED = "Scheduled"  # every pod of the set is bound to a node
    READY = "Ready"  # rank 0 answers readiness: the model is loaded and all ranks joined
    DEGRADED = "Degraded"  # a pod or rank failed; the set is being recreated
    FAILED = "Failed"  # sticky: retries exhausted or the spec can never run
    TERMINATED = "Terminated"  # sticky: idle timeout or the owning Tinker session ended


class Reason(StrEnum):
    PODS_CREATED = "PodsCreated"
    POD_PENDING = "PodPending"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CONTAINER_STARTING = "ContainerStarting"
    TRAINER_READY = "TrainerReady"
    POD_FAILED = "PodFailed"
    OOM_KILLED = "OOMKilled"
    RECREATING = "Recreating"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    INVALID_SPEC = "InvalidSpec"
    IDLE_TIMEOUT = "IdleTimeout"
    SESSION_FINISHED = "SessionFinished"
    POOL_BOUND = "PoolBound"
    WAITING_FOR_CAPACITY = "WaitingForCapacity"  # no pool has room and none may be created (limits)
    POOL_LOST = "PoolLost"  # its pool was deleted: the run is bound again (and replayed by the gateway)
    POOL_NOT_READY = "PoolNotReady"


class _HasTypeStatus(Protocol):
    type: str
    status: str


def is_true(conditions: Iterable[_HasTypeStatus], kind: ConditionType) -> bool:
    return any(c.type == kind and c.status == "True" for c in conditions)


def phase_from(conditions: Iterable[_HasTypeStatus], *, pods_exist: bool) -> Phase:
    """Sticky terminal conditions win, then Degraded, then Ready, then Starting/Pending."""
    conds = list(conditions)
    if is_true(conds, ConditionType.FAILED):
        return Phase.FAILED
    if is_true(conds, ConditionType.TERMINATED):
        return Phase.TERMINATED
    if is_true(conds, ConditionType.DEGRADED):
        return Phase.DEGRADED
    if is_true(conds, ConditionType.READY):
        return Phase.READY
    if pods_exist and is_true(conds, ConditionType.SCHEDULED):
        return Phase.STARTING
    return Phase.PENDING
