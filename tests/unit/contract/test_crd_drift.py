"""The hand-written CRD and the contract's pydantic shapes describe the same object, field by field."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tests.unit.contract import crd_schema
from tinkerkube_contract import conditions, resource

SPEC = crd_schema.openapi_schema()["properties"]["spec"]
STATUS = crd_schema.openapi_schema()["properties"]["status"]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _drift(model: type[BaseModel], schema: dict[str, Any], where: str) -> list[str]:
    if schema.get("type") == "array":
        schema = schema["items"]
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    props = schema.get("properties", {})
    problems = [f"{where}.{k}: in the contract, not in the CRD" for k in fields.keys() - props.keys()]
    problems += [f"{where}.{k}: in the CRD, not in the contract" for k in props.keys() - fields.keys()]
    for key in fields.keys() & props.keys():
        sub = _model_of(fields[key].annotation)
        if sub is not None:
            problems += _drift(sub, props[key], f"{where}.{key}")
    return problems


def test_every_spec_field_is_in_the_schema_and_vice_versa() -> None:
    assert _drift(resource.TrainingSessionSpec, SPEC, "spec") == []


def test_every_status_field_is_in_the_schema_and_vice_versa() -> None:
    assert _drift(resource.TrainingSessionStatus, STATUS, "status") == []


def test_required_spec_fields_match_the_contract() -> None:
    required = {f.alias for f in resource.TrainingSessionSpec.model_fields.values() if f.is_required()}
    assert set(SPEC["required"]) == required == {"baseModel", "modelId", "owner"}


def test_schema_defaults_match_the_contract_defaults() -> None:
    default = resource.TrainingSessionSpec(base_model="m", model_id="x", owner="t").to_k8s()
    for key, sub in SPEC["properties"].items():
        if "default" in sub and sub["default"] != {}:
            assert default[key] == sub["default"], key
    for key, sub in SPEC["properties"]["lora"]["properties"].items():
        if "default" in sub:
            assert default["lora"][key] == sub["default"], key


def test_every_phase_is_enumerated() -> None:
    assert set(STATUS["properties"]["phase"]["enum"]) == {p.value for p in conditions.Phase}


def test_every_condition_type_is_enumerated() -> None:
    items = STATUS["properties"]["conditions"]["items"]
    assert set(items["properties"]["type"]["enum"]) == {c.value for c in conditions.ConditionType}


def test_every_session_mode_is_enumerated() -> None:
    assert set(SPEC["properties"]["mode"]["enum"]) == {m.value for m in resource.SessionMode}


def test_recent_futures_window_matches_the_contract() -> None:
    recent = STATUS["properties"]["futures"]["properties"]["recent"]
    assert recent["maxItems"] == resource.RECENT_FUTURES_WINDOW


def test_identity_matches_the_contract() -> None:
    crd = crd_schema.crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == f"{resource.PLURAL}.{resource.GROUP}"
    assert (crd["spec"]["group"], crd_schema.version()["name"]) == (resource.GROUP, resource.VERSION)
    assert (names["kind"], names["plural"], names["singular"]) == (resource.KIND, resource.PLURAL, resource.SINGULAR)
    assert names["shortNames"] == [resource.SHORT_NAME] and names["categories"] == ["all"]
    assert crd_schema.version()["subresources"] == {"status": {}}


@pytest.mark.parametrize("field", ["baseModel", "lora", "mode", "modelId", "owner", "replicas", "procsPerPod",
                                   "resources", "checkpointStore"])
def test_identity_and_pod_shape_fields_are_immutable(field: str) -> None:
    rules = [v["rule"] for v in SPEC["properties"][field].get("x-kubernetes-validations", [])]
    assert "self == oldSelf" in rules


@pytest.mark.parametrize("field", ["image", "restoreFrom"])
def test_optional_fields_are_immutable_through_whole_spec_rules(field: str) -> None:
    rules = [v["rule"] for v in SPEC.get("x-kubernetes-validations", [])]
    assert any(f"has(self.{field}) == has(oldSelf.{field})" in r and f"self.{field} == oldSelf.{field}" in r
               for r in rules)


def test_printer_columns_are_the_documented_ones() -> None:
    cols = crd_schema.version()["additionalPrinterColumns"]
    default = [c["name"] for c in cols if not c.get("priority")]
    wide = [c["name"] for c in cols if c.get("priority") == 1]
    assert default == ["Phase", "Model", "Ranks", "Pool", "Pending", "Completed", "Age"]
    assert wide == ["Endpoint", "Owner"]
    assert all("[-1:]" not in c["jsonPath"] for c in cols)


def test_conditions_are_a_bounded_map_keyed_by_type() -> None:
    conds = STATUS["properties"]["conditions"]
    assert conds["x-kubernetes-list-type"] == "map" and conds["x-kubernetes-list-map-keys"] == ["type"]
    assert conds["maxItems"] >= len(conditions.ConditionType)


POOL_CRD = yaml.safe_load((Path(__file__).resolve().parents[3] / "crds" / "trainerpool.yaml").read_text())
POOL_SCHEMA = POOL_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]


def test_every_pool_spec_and_status_field_is_in_its_schema_and_vice_versa() -> None:
    assert _drift(resource.TrainerPoolSpec, POOL_SCHEMA["spec"], "spec") == []
    assert _drift(resource.TrainerPoolStatus, POOL_SCHEMA["status"], "status") == []


def test_pool_schema_defaults_and_enums_match_the_contract() -> None:
    default = resource.TrainerPoolSpec(base_model="m").to_k8s()
    for key, sub in POOL_SCHEMA["spec"]["properties"].items():
        if "default" in sub and sub["default"] != {}:
            assert default[key] == sub["default"], key
    assert set(POOL_SCHEMA["spec"]["properties"]["sharding"]["enum"]) == {s.value for s in resource.Sharding}
    assert set(POOL_SCHEMA["spec"]["properties"]["sampler"]["enum"]) == {s.value for s in resource.Sampler}
    conds = POOL_SCHEMA["status"]["properties"]["conditions"]["items"]["properties"]["type"]["enum"]
    assert set(conds) == {c.value for c in conditions.ConditionType}
    assert POOL_CRD["spec"]["names"]["plural"] == resource.POOL_PLURAL
    assert POOL_CRD["spec"]["names"]["kind"] == resource.POOL_KIND
