"""Which replica leads (kopf's peering rule, read from a peering object's status), for the warm-pool refill."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from tinkerkube_operator import leader
from tinkerkube_operator.leader import Peering

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _peer(priority: int, seen_ago: float = 1.0, lifetime: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_the_highest_live_priority_leads_and_the_others_stand_by() -> None:
    peers = {"a": _peer(20), "b": _peer(10)}
    assert leader.leads(peers, 20, NOW)
    assert not leader.leads(peers, 10, NOW)


def test_a_dead_peer_does_not_count() -> None:
    peers = {"a": _peer(20, seen_ago=120), "b": _peer(10)}
    assert leader.leads(peers, 10, NOW)


def test_equal_priorities_pause_both_as_kopf_does() -> None:
    peers = {"a": _peer(10), "b": _peer(10)}
    assert not leader.leads(peers, 10, NOW)


def test_a_replica_not_registered_yet_stands_by() -> None:
    assert not leader.leads({"a": _peer(5)}, 10, NOW)
    assert not leader.leads({}, 10, NOW)
    assert not leader.leads(None, 10, NOW)


class _Kube:
    def __init__(self, objects: dict[str | None, dict[str, Any]]) -> None:
        self.objects, self.asked = objects, []  # type: list[str | None]

    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        self.asked.append(namespace)
        return self.objects.get(namespace)


def test_is_leader_reads_the_peering_of_its_scope() -> None:
    status = {"status": {"me": _peer(20), "other": _peer(10)}}
    kube = _Kube({None: status})
    assert asyncio.run(leader.is_leader(kube, Peering(standalone=False, name="tk", priority=20), now=NOW))  # type: ignore[arg-type]
    assert kube.asked == [None]
    namespaced = _Kube({"ns1": status, "ns2": {"status": {"x": _peer(30)}}})
    assert not asyncio.run(leader.is_leader(namespaced, Peering(  # type: ignore[arg-type]
        standalone=False, name="tk", priority=20, clusterwide=False, namespaces=("ns1", "ns2")), now=NOW))


def test_standalone_always_leads_and_a_missing_mandatory_peering_stands_by() -> None:
    kube = _Kube({})
    assert asyncio.run(leader.is_leader(kube, Peering(standalone=True), now=NOW))  # type: ignore[arg-type]
    assert kube.asked == []
    assert not asyncio.run(leader.is_leader(kube, Peering(standalone=False, name="tk", mandatory=True),  # type: ignore[arg-type]
                                            now=NOW))
    assert asyncio.run(leader.is_leader(kube, Peering(standalone=False, name="tk"), now=NOW))  # type: ignore[arg-type]
