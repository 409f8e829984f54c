"""The chart's CRD is crds/ itself (a symlink, never a hand-kept copy), and every TrainingSession example in
docs/ validates against the CRD's openAPIV3Schema."""

from __future__ import annotations

import copy
import re
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.conftest import CHART, EXAMPLES, ROOT, Helm, load_yaml_docs

SOURCE = ROOT / "crds" / "trainingsession.yaml"
CHART_CRD = CHART / "crds" / "trainingsession.yaml"
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_chart_crd_is_a_symlink_to_the_single_source() -> None:
    assert CHART_CRD.is_symlink(), "charts/tinkerkube/crds/trainingsession.yaml must link to crds/, not copy it"
    assert CHART_CRD.resolve() == SOURCE.resolve()


def test_the_pool_crd_is_a_symlink_too() -> None:
    link = CHART / "crds" / "trainerpool.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "crds" / "trainerpool.yaml").resolve()


def test_every_top_level_crd_is_in_the_chart() -> None:
    top = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name for p in (CHART / "crds").glob("*.yaml")}
    assert top == chart


def test_packaged_chart_carries_the_crd_bytes(helm: Helm, tmp_path: Path) -> None:
    # helm follows the symlink when packaging: the released chart holds the real content.
    helm.run("package", str(CHART), "-d", str(tmp_path))
    (package,) = tmp_path.glob("tinkerkube-*.tgz")
    with tarfile.open(package) as tar:
        member = tar.extractfile("tinkerkube/crds/trainingsession.yaml")
        assert member is not None
        assert member.read() == SOURCE.read_bytes()
        pool = tar.extractfile("tinkerkube/crds/trainerpool.yaml")
        assert pool is not None
        assert pool.read() == (ROOT / "crds" / "trainerpool.yaml").read_bytes()
    shown = [d for d in yaml.safe_load_all(helm.run("show", "crds", str(package)).stdout) if d]
    assert yaml.safe_load(SOURCE.read_text()) in shown
    assert yaml.safe_load((ROOT / "crds" / "trainerpool.yaml").read_text()) in shown


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (what CRDs speak) → JSON Schema draft 7: `nullable`, boolean `exclusiveMinimum/Maximum`."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    for bound, key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(key)
        elif out.get(bound) is False:
            out.pop(bound)
    return out


@pytest.fixture(scope="module")
def ts_validator(crd: dict[str, Any]) -> jsonschema.Draft7Validator:
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = _openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _examples() -> list[Path]:
    return sorted(EXAMPLES.glob("trainingsession-*.yaml"))


def test_there_are_trainingsession_examples() -> None:
    assert len(_examples()) >= 3


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_trainingsession_example_validates_against_the_crd(path: Path, ts_validator: jsonschema.Draft7Validator,
                                                           crd: dict[str, Any]) -> None:
    for doc in load_yaml_docs(path):
        assert doc["apiVersion"] == f"{crd['spec']['group']}/v1alpha1" and doc["kind"] == crd["spec"]["names"]["kind"]
        errors = [f"{list(e.path)}: {e.message}" for e in ts_validator.iter_errors(doc)]
        assert not errors, errors
        name = doc["metadata"]["name"]
        assert RFC1035.match(name) and len(name) <= 63, "the CRD's CEL rule wants an RFC 1035 name"


def test_the_validator_rejects_a_bad_session(ts_validator: jsonschema.Draft7Validator) -> None:
    doc = load_yaml_docs(EXAMPLES / "trainingsession-cpu.yaml")[0]
    doc["spec"]["lora"]["rank"] = 0
    doc["spec"]["mode"] = "serve"
    del doc["spec"]["owner"]
    messages = " ".join(e.message for e in ts_validator.iter_errors(doc))
    assert "owner" in messages and "serve" in messages and "0 is less than the minimum" in messages
