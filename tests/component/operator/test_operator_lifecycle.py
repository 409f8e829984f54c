"""The operator against the emulated API server: children, status, failures, restarts, deletion."""

from __future__ import annotations

from typing import Any

from tests.component.operator.conftest import session_body
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet
from tinkerkube_contract import env
from tinkerkube_contract.resource import (
    LABEL_GENERATION,
    LABEL_NODE_RANK,
    LABEL_ROLE,
    LABEL_SESSION,
    LABEL_TENANT,
    PLURAL,
)

TS = PLURAL


def _phase(api: Api, ns: str, name: str) -> str | None:
    obj = api.get(TS, ns, name) or {}
    return (obj.get("status") or {}).get("phase")


def _wait_phase(api: Api, ns: str, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    eventually_sync(lambda: _phase(api, ns, name), lambda p: p == phase, timeout=timeout, what=f"phase {phase}")
    return api.get(TS, ns, name) or {}


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


def _pods(api: Api, ns: str, name: str) -> list[dict[str, Any]]:
    return api.list("pods", ns, **{LABEL_SESSION: name})


def test_create_makes_pods_and_service_with_env_labels_and_owner_refs(
        api: Api, namespace: str, operator: OperatorProcess) -> None:
    created = api.create(TS, namespace, session_body("alpha", replicas=2, procsPerPod=2))
    obj = _wait_phase(api, namespace, "alpha", "Ready")
    pods = sorted(_pods(api, namespace, "alpha"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["alpha-g0-0", "alpha-g0-1"]
    for rank, pod in enumerate(pods):
        labels = pod["metadata"]["labels"]
        assert labels[LABEL_NODE_RANK] == str(rank) and labels[LABEL_GENERATION] == "0"
        assert labels[LABEL_ROLE] == "trainer" and labels[LABEL_TENANT] == "tenant-a"
        (owner,) = pod["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"] and owner["controller"] is True
        values = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert values[env.MODEL_ID] == "s1:train:alpha" and "--nproc_per_node=2" in pod["spec"]["containers"][0][
            "command"]
    svc = api.get("services", namespace, "alpha")
    assert svc is not None and svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    status = obj["status"]
    assert status["endpoint"]["url"] == f"http://{pods[0]['status']['podIP']}:8080"
    assert status["worldSize"] == 4 and status["observedGeneration"] == 1 and status["restarts"] == 0


def test_pod_failure_degrades_then_the_set_is_recreated(
        api: Api, namespace: str, operator: OperatorProcess, kubelet: Kubelet, cluster: EmulatedCluster) -> None:
    api.create(TS, namespace, session_body("beta"))
    _wait_phase(api, namespace, "beta", "Ready")
    cluster.run(kubelet.fail_pod(namespace, "beta-g0-0", exit_code=137))
    _wait_phase(api, namespace, "beta", "Degraded", timeout=10)
    obj = _wait_phase(api, namespace, "beta", "Ready")
    assert obj["status"]["restarts"] == 1
    assert _condition(obj, "Degraded")["status"] == "False"
    names = eventually_sync(lambda: [p["metadata"]["name"] for p in _pods(api, namespace, "beta")],
                            lambda n: n == ["beta-g1-0"], what="only the new generation")
    assert names == ["beta-g1-0"]


def test_a_pod_that_keeps_crashing_ends_failed_and_stays_failed(
        api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("gamma", image="crash:latest"))
    obj = _wait_phase(api, namespace, "gamma", "Failed", timeout=30)
    failed = _condition(obj, "Failed")
    assert failed["reason"] == "RetriesExhausted" and "exited with code 1" in failed["message"]
    assert obj["status"]["restarts"] == 2
    eventually_sync(lambda: _pods(api, namespace, "gamma"), lambda p: p == [], what="pods removed")
    import time

    time.sleep(1.0)  # several reconcile intervals: nothing is recreated for a Failed session
    assert _pods(api, namespace, "gamma") == [] and _phase(api, namespace, "gamma") == "Failed"


def test_unschedulable_session_ends_failed_with_the_reason(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("delta", resources={"gpus": 4}))
    obj = _wait_phase(api, namespace, "delta", "Failed", timeout=20)
    failed = _condition(obj, "Failed")
    assert failed["reason"] == "Unschedulable" and "nvidia.com/gpu" in failed["message"]


def test_image_that_never_pulls_ends_failed(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("epsilon", image="nope:latest"))
    obj = _wait_phase(api, namespace, "epsilon", "Failed", timeout=20)
    assert _condition(obj, "Failed")["reason"] == "ImagePullBackOff"


def test_idle_session_is_terminated_and_its_pods_deleted(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("zeta", idleTimeoutSeconds=2))
    _wait_phase(api, namespace, "zeta", "Ready")
    obj = _wait_phase(api, namespace, "zeta", "Terminated", timeout=20)
    assert _condition(obj, "Terminated")["reason"] == "IdleTimeout"
    eventually_sync(lambda: _pods(api, namespace, "zeta"), lambda p: p == [], what="pods removed")
    assert api.get("services", namespace, "zeta") is None


def test_operator_restart_creates_no_duplicates(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("eta", replicas=2))
    _wait_phase(api, namespace, "eta", "Ready")
    before = {p["metadata"]["uid"] for p in _pods(api, namespace, "eta")}
    operator.stop()
    operator.start()
    api.create(TS, namespace, session_body("theta"))
    _wait_phase(api, namespace, "theta", "Ready")
    after = {p["metadata"]["uid"] for p in _pods(api, namespace, "eta")}
    assert after == before and len(after) == 2


def test_deleting_the_session_removes_its_children(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("iota", replicas=2))
    _wait_phase(api, namespace, "iota", "Ready")
    assert api.delete(TS, namespace, "iota") == 200
    eventually_sync(lambda: api.get(TS, namespace, "iota"), lambda o: o is None, what="session gone")
    assert _pods(api, namespace, "iota") == [] and api.get("services", namespace, "iota") is None


def test_events_are_posted_on_phase_changes(api: Api, namespace: str, operator: OperatorProcess) -> None:
    api.create(TS, namespace, session_body("kappa"))
    _wait_phase(api, namespace, "kappa", "Ready")
    events = eventually_sync(lambda: [e for e in api.list("events", namespace)
                                      if e.get("involvedObject", {}).get("name") == "kappa"],
                             lambda es: any(e.get("reason") == "TrainerReady" for e in es), what="Ready event")
    assert all(len(e.get("message", "")) <= 1024 for e in events)


def test_a_spec_the_schema_would_reject_ends_failed_not_crash_looping(
        api: Api, namespace: str, operator: OperatorProcess) -> None:
    # The emulator does not validate like an API server would: this stands for anything that slips past.
    api.create(TS, namespace, session_body("lambda", replicas=0))
    obj = _wait_phase(api, namespace, "lambda", "Failed")
    assert _condition(obj, "Failed")["reason"] == "InvalidSpec" and "replicas" in _condition(obj, "Failed")["message"]
    assert _pods(api, namespace, "lambda") == []
