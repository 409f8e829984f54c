"""Pool binding against the emulated API server (the real operator under kopf, pods by the fake kubelet):
sessions bound to TrainerPools of their tenant and base model, pools with room reused, tenants kept apart,
pool pods rendered from the pool, a deleted pool's runs bound again, warm pools claimed and refilled,
per-tenant limits making a session wait (and then proceed), idle pools deleted."""

from __future__ import annotations

from typing import Any

import pytest

from tests.component.operator.conftest import session_body
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet
from tinkerkube_contract import env
from tinkerkube_contract.resource import FINALIZER, LABEL_POOL, LABEL_SESSION, PLURAL, POOL_PLURAL
from tinkerkube_operator.settings import OperatorSettings

TS, TP = PLURAL, POOL_PLURAL
TINY = "tinkerkube/tiny-qwen3"
NO_TICK = 3600.0  # reconcile_interval_seconds: the sessions' and pools' own clocks never tick in a test


@pytest.fixture
def operator_settings(cluster: EmulatedCluster, request: pytest.FixtureRequest) -> OperatorSettings:
    """Pool binding on; a test's indirect parameter (a dict) overrides settings."""
    values: dict[str, Any] = {
        "api_url": cluster.url, "standalone": True, "metrics_port": 0, "reconcile_interval_seconds": 0.3,
        "backoff_seconds": 0.2, "backoff_max_seconds": 1.0, "max_restarts": 2, "auth_token_secret": None,
        "trainer_image": "trainer:test", "pools": True, "warm_pools_namespace": request.getfixturevalue("namespace"),
        "pool_max_runs": 2, "pool_idle_timeout_seconds": 0, **getattr(request, "param", {})}
    return OperatorSettings(**values)


def _status(api: Api, ns: str, plural: str, name: str) -> dict[str, Any]:
    return (api.get(plural, ns, name) or {}).get("status") or {}


def _ready(api: Api, ns: str, name: str, timeout: float = 20) -> dict[str, Any]:
    return eventually_sync(lambda: _status(api, ns, TS, name), lambda s: s.get("phase") == "Ready" and s.get("pool"),
                           timeout=timeout, what=f"{name} bound and Ready")


def _delete_pool(api: Api, ns: str, name: str) -> None:
    """Delete a pool once kopf has put its finalizer on it: the emulator has no garbage collector, so a pool
    deleted before that would leave its pods behind (a cluster's GC deletes them by their ownerReference)."""
    eventually_sync(lambda: (api.get(TP, ns, name) or {}).get("metadata", {}).get("finalizers") or [],
                    lambda found: FINALIZER in found, timeout=10, what=f"the operator's finalizer on {name}")
    assert api.delete(TP, ns, name) == 200


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


def _session(name: str, owner: str = "tenant-a", **spec: Any) -> dict[str, Any]:
    body = session_body(name, **spec)
    body["spec"]["owner"] = owner
    return body


def test_sessions_share_a_pool_until_it_is_full_and_tenants_never_share(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    for name in ("a1", "a2", "a3"):
        api.create(TS, namespace, _session(name))
    api.create(TS, namespace, _session("b1", owner="tenant-b"))
    pools = {name: _ready(api, namespace, name)["pool"] for name in ("a1", "a2", "a3", "b1")}
    assert len({pools["a1"], pools["a2"], pools["a3"]}) == 2  # maxRuns 2: the third run needs a second pool
    assert pools["b1"] not in {pools["a1"], pools["a2"], pools["a3"]}
    shared = pools["a1"] if pools["a1"] == pools["a2"] else pools["a3"]
    pool = api.get(TP, namespace, shared) or {}
    assert pool["spec"]["owner"] == "tenant-a" and pool["spec"]["baseModel"] == TINY
    status = eventually_sync(lambda: _status(api, namespace, TP, shared), lambda s: s.get("runsUsed") == 2,
                             timeout=10, what="runs counted on the pool")
    assert status["runsFree"] == 0 and status["phase"] == "Ready"
    # The run's endpoint is its pool's; its pods belong to the pool, not to the session.
    assert _status(api, namespace, TS, "a1")["endpoint"]["url"] == \
        _status(api, namespace, TP, pools["a1"])["endpoint"]["url"]
    assert api.list("pods", namespace, **{LABEL_SESSION: "a1"}) == []
    (pod,) = api.list("pods", namespace, **{LABEL_POOL: shared})
    values = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert values[env.BASE_MODEL] == TINY and values[env.MAX_RUNS] == "2" and env.MODEL_ID not in values
    assert values[env.SHARDING] == "replicate" and values[env.SAMPLER] == "hf"
    assert _condition(_status(api, namespace, TS, "a1"), "Bound")["status"] == "True"


def test_a_deleted_pool_s_runs_are_bound_to_a_new_pool(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    api.create(TS, namespace, _session("r1"))
    api.create(TS, namespace, _session("r2"))
    first = _ready(api, namespace, "r1")["pool"]
    assert _ready(api, namespace, "r2")["pool"] == first
    _delete_pool(api, namespace, first)
    for name in ("r1", "r2"):
        eventually_sync(lambda n=name: _status(api, namespace, TS, n),
                        lambda s: s.get("pool") not in (None, first) and s.get("phase") == "Ready",
                        timeout=20, what=f"{name} bound again")
    assert _status(api, namespace, TS, "r1")["pool"] == _status(api, namespace, TS, "r2")["pool"]
    eventually_sync(lambda: api.list("pods", namespace, **{LABEL_POOL: first}), lambda p: p == [], timeout=10,
                    what="the deleted pool's pods gone")


@pytest.mark.parametrize("operator_settings", [{"warm_pools": {TINY: 1}}], indirect=True)
def test_a_warm_pool_is_claimed_by_the_first_tenant_and_refilled(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    warm = eventually_sync(lambda: [p for p in api.list(TP, namespace) if p["spec"].get("owner", "") == ""
                                    and (p.get("status") or {}).get("phase") == "Ready"],
                           lambda found: len(found) == 1, timeout=20, what="one ready warm pool")
    name = warm[0]["metadata"]["name"]
    api.create(TS, namespace, _session("w1"))
    assert _ready(api, namespace, "w1")["pool"] == name
    assert (api.get(TP, namespace, name) or {})["spec"]["owner"] == "tenant-a"
    eventually_sync(lambda: [p["metadata"]["name"] for p in api.list(TP, namespace)
                             if p["spec"].get("owner", "") == ""],
                    lambda found: len(found) == 1 and found[0] != name, timeout=20, what="a new warm pool")


@pytest.mark.parametrize("operator_settings", [{"reconcile_interval_seconds": NO_TICK}], indirect=True)
def test_sessions_follow_their_pool_s_changes_without_a_clock_tick(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    # No clock ticks: a pool's events (Ready, runs counted, deleted) must reach its sessions by themselves.
    api.create(TS, namespace, _session("e1"))
    api.create(TS, namespace, _session("e2"))
    first = _ready(api, namespace, "e1")["pool"]  # the pool became Ready after e1 bound: e1 followed it
    assert _ready(api, namespace, "e2")["pool"] == first
    eventually_sync(lambda: _status(api, namespace, TP, first), lambda s: s.get("runsUsed") == 2, timeout=10,
                    what="both runs counted on the pool")
    _delete_pool(api, namespace, first)
    for name in ("e1", "e2"):
        eventually_sync(lambda n=name: _status(api, namespace, TS, n),
                        lambda s: s.get("pool") not in (None, first) and s.get("phase") == "Ready",
                        timeout=20, what=f"{name} bound again and Ready")
    second = _status(api, namespace, TS, "e1")["pool"]
    assert _status(api, namespace, TS, "e2")["pool"] == second
    eventually_sync(lambda: _status(api, namespace, TP, second), lambda s: s.get("runsUsed") == 2, timeout=10,
                    what="both runs counted on the new pool")
    assert api.delete(TS, namespace, "e1") == 200
    status = eventually_sync(lambda: _status(api, namespace, TP, second), lambda s: s.get("runsUsed") == 1,
                             timeout=10, what="the deleted session's slot freed")
    assert status["runs"] == ["e2"] and status["runsFree"] == 1


@pytest.mark.parametrize("operator_settings", [{"pool_max_runs": 1, "max_pools_per_tenant": 1,
                                                "reconcile_interval_seconds": NO_TICK}], indirect=True)
def test_a_session_over_the_tenant_limit_waits_then_proceeds(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    api.create(TS, namespace, _session("c1"))
    first = _ready(api, namespace, "c1")["pool"]
    api.create(TS, namespace, _session("c2"))
    waiting = eventually_sync(lambda: _status(api, namespace, TS, "c2"),
                              lambda s: any(c["type"] == "Bound" for c in s.get("conditions", [])), timeout=10,
                              what="c2 waits")
    bound = _condition(waiting, "Bound")
    assert bound["status"] == "False" and bound["reason"] == "WaitingForCapacity"
    assert "max_pools_per_tenant" in bound["message"] and waiting["phase"] == "Pending" and not waiting.get("pool")
    assert len(api.list(TP, namespace)) == 1
    assert api.delete(TS, namespace, "c1") == 200
    assert _ready(api, namespace, "c2")["pool"] == first  # the freed slot, seen without a clock tick


@pytest.mark.parametrize("operator_settings", [{"pool_idle_timeout_seconds": 1}], indirect=True)
def test_an_owned_pool_without_runs_is_deleted_after_its_idle_timeout(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet) -> None:
    api.create(TS, namespace, _session("i1"))
    pool = _ready(api, namespace, "i1")["pool"]
    assert api.delete(TS, namespace, "i1") == 200
    eventually_sync(lambda: api.get(TP, namespace, pool), lambda p: p is None, timeout=20, what="idle pool deleted")
    eventually_sync(lambda: api.list("pods", namespace, **{LABEL_POOL: pool}), lambda p: p == [], timeout=10,
                    what="its pods gone")
