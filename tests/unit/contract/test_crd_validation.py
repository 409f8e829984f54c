"""The CRD's openAPIV3Schema accepts what the contract produces and rejects invalid specs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.unit.contract import crd_schema
from tinkerkube_contract import resource
from tinkerkube_contract.conditions import ConditionType


def _session(**spec: Any) -> dict[str, Any]:
    base = {"baseModel": "tinkerkube/tiny-qwen3", "modelId": "s1:train:0", "owner": "tenant-a"}
    return {"apiVersion": resource.API_VERSION, "kind": resource.KIND, "metadata": {"name": "a"},
            "spec": {**base, **spec}}


def test_a_spec_rendered_by_the_contract_is_valid() -> None:
    spec = resource.TrainingSessionSpec(
        base_model="m", model_id="s:train:0", owner="t", restore_from="tinker://s:train:0/weights/w",
        replicas=2, procs_per_pod=2, resources=resource.Resources(gpus=1, cpu="2", memory="4Gi"),
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        lora=resource.LoraSpec(seed=3),
    )
    assert crd_schema.errors({"metadata": {}, "spec": spec.to_k8s()}) == []


def test_a_full_status_rendered_by_the_contract_is_valid() -> None:
    status = resource.TrainingSessionStatus(
        phase="Ready", observed_generation=1, world_size=2, restarts=1,
        conditions=[resource.Condition(type=ConditionType.READY, status="True", reason="TrainerReady",
                                       last_transition_time="2026-01-01T00:00:00Z")],
        endpoint=resource.Endpoint(url="http://10.0.0.1:8080", pod_name="a-0", service_name="a"),
        futures=resource.FuturesStatus(submitted=3, completed=2, pending=1, last_seq_id=3,
                                       recent=[resource.RecentFuture(request_id="r", op="optim_step",
                                                                     state="complete")]),
    )
    assert crd_schema.errors({"spec": _session()["spec"], "status": status.to_k8s()}) == []


@pytest.mark.parametrize("missing", ["baseModel", "modelId", "owner"])
def test_required_fields_are_enforced(missing: str) -> None:
    obj = _session()
    del obj["spec"][missing]
    assert any(missing in e for e in crd_schema.errors(obj))


@pytest.mark.parametrize(("field", "value"), [
    ("replicas", 0), ("replicas", 65), ("procsPerPod", 0), ("procsPerPod", 9),
    ("mode", "serve"), ("idleTimeoutSeconds", -1), ("restoreFrom", "s3://bucket/x"),
    ("resources", {"gpus": 9}), ("resources", {"gpus": -1}), ("resources", {"memory": "lots"}),
    ("lora", {"rank": 0}), ("lora", {"rank": 513}), ("lora", {"alpha": 0}),
    ("tolerations", [{"operator": "Maybe"}]), ("checkpointStore", {"hostPath": "relative/dir"}),
    ("baseModel", ""),
])
def test_out_of_bounds_values_are_rejected(field: str, value: Any) -> None:
    assert crd_schema.errors(_session(**{field: value})) != []


def test_too_many_recent_futures_are_rejected() -> None:
    recent = [{"requestId": str(i), "op": "sample", "state": "pending"} for i in range(17)]
    assert crd_schema.errors({**_session(), "status": {"futures": {"recent": recent}}}) != []


def test_unknown_phase_and_condition_type_are_rejected() -> None:
    assert crd_schema.errors({**_session(), "status": {"phase": "Running"}}) != []
    assert crd_schema.errors({**_session(), "status": {"conditions": [{"type": "Happy", "status": "True"}]}}) != []


def _name_rule() -> re.Pattern[str]:
    (rule,) = [v["rule"] for v in crd_schema.openapi_schema()["x-kubernetes-validations"]]
    assert "self.metadata.name.size() <= 63" in rule
    return re.compile(re.search(r"matches\('(.+?)'\)", rule).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "ok"), [
    ("a", True), ("train-abc-0123", True), ("a" * 63, True), ("a" * 64, False),
    ("0abc", False), ("Abc", False), ("abc-", False), ("a.b", False),
])
def test_name_rule_admits_only_rfc1035_labels(name: str, ok: bool) -> None:
    assert (bool(_name_rule().fullmatch(name)) and len(name) <= 63) is ok
