"""Load crds/trainingsession.yaml and turn its openAPIV3Schema into a JSON Schema validator.

The API server's structural schema differs from JSON Schema draft 4/2020 in two spots we use:
`nullable: true` and the boolean `exclusiveMinimum` of OpenAPI 3.0; `x-kubernetes-*` keys are ignored
(CEL rules are checked separately, by shape).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[3] / "crds" / "trainingsession.yaml"


@cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def version() -> dict[str, Any]:
    (only,) = crd()["spec"]["versions"]
    return only


def openapi_schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


def _to_jsonschema(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: _to_jsonschema(v) for k, v in node["properties"].items()}
    return out


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_to_jsonschema(openapi_schema()), format_checker=jsonschema.FormatChecker())


def errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(obj)]
