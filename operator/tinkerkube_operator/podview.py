"""Pure: what the operator needs to know about one Pod, read from its API object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tinkerkube_contract.resource import LABEL_GENERATION, LABEL_NODE_RANK, LABEL_POOL, LABEL_SESSION

IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    namespace: str
    session: str  # the owner's name: its TrainingSession's, or its TrainerPool's
    rank: int
    generation: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    ip: str | None = None
    ready: bool = False
    scheduled: bool = False
    unschedulable: str | None = None  # the scheduler's message while it cannot place the pod
    waiting_reason: str | None = None
    waiting_message: str | None = None
    terminated_reason: str | None = None
    exit_code: int | None = None
    deleting: bool = False
    created: datetime | None = None

    @property
    def image_pull_failing(self) -> bool:
        return self.waiting_reason in IMAGE_PULL_REASONS

    @property
    def exited(self) -> bool:
        return self.phase in ("Failed", "Succeeded")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def observe(pod: Mapping[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    sched = conds.get("PodScheduled") or {}
    container = next(iter(status.get("containerStatuses") or []), {})
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or {}
    return PodView(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        session=labels.get(LABEL_SESSION) or labels.get(LABEL_POOL, ""),
        rank=int(labels.get(LABEL_NODE_RANK, 0)),
        generation=int(labels.get(LABEL_GENERATION, 0)),
        phase=status.get("phase") or "Pending",
        ip=status.get("podIP") or None,
        ready=(conds.get("Ready") or {}).get("status") == "True",
        scheduled=sched.get("status") == "True" or bool((pod.get("spec") or {}).get("nodeName")),
        unschedulable=(sched.get("message") or "unschedulable") if sched.get("reason") == "Unschedulable" else None,
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        terminated_reason=terminated.get("reason"),
        exit_code=terminated.get("exitCode"),
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_time(meta.get("creationTimestamp")),
    )
