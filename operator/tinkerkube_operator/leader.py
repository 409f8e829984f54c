"""Is this operator replica kopf's peering leader? For the work that no resource event starts (the warm-pool
refill): kopf pauses resource handlers, daemons and timers on non-leaders, but not a startup task.

kopf's rule (`process_peering_event` in kopf/_core/engines/peering.py): a replica works while no other live
peer (last seen within its lifetime) has a higher priority or the same one. Here without kopf's private
identity: a replica leads when its priority is the highest among the live peers and exactly one live peer
(itself) holds it. Before it has registered itself it stands by; an equal-priority twin pauses both, as in
kopf. A missing peering object pauses a replica whose peering is mandatory (kopf's `peering_missing`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from tinkerkube_operator.kube import Kube


@dataclass(frozen=True, slots=True)
class Peering:
    """This replica's peering, as kopf runs it (`kopf.OperatorSettings.peering`, read at startup)."""

    standalone: bool = True
    name: str = ""
    priority: int = 0
    mandatory: bool = False
    clusterwide: bool = True
    namespaces: tuple[str, ...] = ()

    @classmethod
    def from_kopf(cls, settings: kopf.OperatorSettings, namespaces: list[str]) -> Peering:
        p = settings.peering
        return cls(standalone=p.standalone, name=p.name, priority=p.priority, mandatory=p.mandatory,
                   clusterwide=p.clusterwide, namespaces=tuple(namespaces))


def _live(peers: Mapping[str, Any], now: datetime) -> list[int]:
    out = []
    for info in peers.values():
        if not isinstance(info, Mapping):
            continue
        seen = info.get("lastseen")
        try:
            last = datetime.fromisoformat(seen) if seen else now
        except ValueError:
            continue
        if last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        if last + timedelta(seconds=int(info.get("lifetime", 60))) > now:
            out.append(int(info.get("priority", 0)))
    return out


def leads(peers: Mapping[str, Any] | None, priority: int, now: datetime) -> bool:
    """`peers`: a peering object's status (identity → priority, lifetime, lastseen)."""
    live = _live(peers or {}, now)
    return live.count(priority) == 1 and max(live) == priority


async def is_leader(kube: Kube, peering: Peering, *, now: datetime | None = None) -> bool:
    if peering.standalone:
        return True
    now = now or datetime.now(UTC)
    scopes: list[str | None] = [None] if peering.clusterwide else list(peering.namespaces)
    for namespace in scopes:
        body = await kube.get_peering(namespace, peering.name)
        if body is None:
            if peering.mandatory:
                return False
            continue
        if not leads(body.get("status"), peering.priority, now):
            return False
    return True
