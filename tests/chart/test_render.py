"""helm lint and helm template of every values set, validated offline against Kubernetes 1.28 to 1.33."""

from __future__ import annotations

import copy
import functools
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from tests.chart.conftest import CHART, EXAMPLES, EXPECTED_SETS, VALUES_SETS, Helm

K8S_VERSIONS = ["1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
assert all(v in kv.all_versions() for v in K8S_VERSIONS), "kubernetes-validate lacks a supported version"
# Custom resources: kubernetes-validate has no schema for them (TrainingSessions are checked against the
# CRD in test_crds.py; the Prometheus Operator and kopf own theirs).
CUSTOM_GROUPS = ("monitoring.coreos.com/", "kopf.dev/", "tinkerkube.dev/")


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    """kubernetes-validate's own schema lookup (strict: unknown fields are errors), with the validator cached:
    its `validate()` re-reads the large _definitions.json on every call."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"v{version}-local-strict"
    schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group_version}.json", version)
    definitions = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_every_documented_values_example_is_rendered() -> None:
    assert set(VALUES_SETS) >= EXPECTED_SETS


def test_chart_lints_clean(helm: Helm) -> None:
    proc = helm.run("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / "kind-values.yaml"))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_rendered_manifests_are_valid_for_supported_kubernetes(helm: Helm, values_set: str) -> None:
    docs = helm.render(values_set).docs
    assert docs, f"{values_set} rendered nothing"
    failures = []
    for version in K8S_VERSIONS:
        for doc in docs:
            if doc["apiVersion"].startswith(CUSTOM_GROUPS):
                continue
            for exc in _validator(version, doc["kind"], doc["apiVersion"]).iter_errors(doc):
                where = f"{doc['kind']}/{doc['metadata']['name']}"
                failures.append(f"k8s {version} {where}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_every_name_fits_a_dns_label(helm: Helm, values_set: str) -> None:
    long = [d["metadata"]["name"] for d in helm.render(values_set).docs if len(d["metadata"]["name"]) > 63]
    assert not long


def test_a_very_long_release_name_is_truncated_to_63_characters(helm: Helm) -> None:
    # Helm caps release names at 53 characters; the namespace goes into cluster-scoped names too.
    proc = helm.run("template", "r" * 53, str(CHART), "--namespace", "n" * 63)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert all(len(n) <= 63 and not n.endswith("-") for _, n in names), [n for _, n in names if len(n) > 63]
    assert len(set(names)) == len(names), "two objects of one kind share a name after truncation"


def _render_notes(helm: Helm, tmp_path: Path, *args: str) -> str:
    """`helm template` skips NOTES.txt; in a copy of the chart the notes become a named template that a
    ConfigMap renders, so the same engine and values produce them."""
    chart = tmp_path / "tinkerkube"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
    )
    proc = helm.run("template", "tk", str(chart), "--namespace", "tinkerkube",
                    "--show-only", "templates/notes.yaml", *args)
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_tell_how_to_point_the_sdk_at_the_gateway(helm: Helm, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path, "-f", str(EXAMPLES / "values-ingress-tls.yaml"))
    assert "export TINKER_BASE_URL=https://tinker.example.com" in notes
    assert "export TINKER_API_KEY=" in notes


def test_notes_without_ingress_use_a_port_forward(helm: Helm, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path)
    assert "port-forward svc/tk-tinkerkube-gateway 8000:80" in notes
    assert "get secret tk-tinkerkube-api-keys" in notes, "tells how to read the generated key"
    assert "export TINKER_BASE_URL=http://127.0.0.1:8000" in notes


def test_the_offline_validator_catches_wrong_types_and_unknown_fields(helm: Helm) -> None:
    deploy = copy.deepcopy(helm.render("default").find("Deployment", "-gateway"))
    deploy["spec"]["replicas"] = "three"
    deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolic"] = "Always"
    errors = [e.message for e in _validator("1.28.0", "Deployment", "apps/v1").iter_errors(deploy)]
    assert any("three" in m for m in errors) and any("imagePullPolic" in m for m in errors), errors
