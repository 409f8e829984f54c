"""values.schema.json rejects bad values (helm enforces it on every install), and every key is documented."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from tests.chart.conftest import CHART, EXAMPLES, Helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


def _with(path: str, value: object) -> dict:
    values = json.loads(json.dumps(DEFAULTS))
    node = values
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return values


def test_defaults_and_examples_satisfy_the_schema() -> None:
    jsonschema.validate(DEFAULTS, SCHEMA)
    for path in [CHART / "ci" / "kind-values.yaml", *EXAMPLES.glob("values-*.yaml")]:
        jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize(("path", "value"), [
    ("gateway.replicas", 0),
    ("gateway.replicas", "two"),
    ("gateway.image.pullPolicy", "Sometimes"),
    ("gateway.port", 80),
    ("gateway.apiKeys.keys", ["tml-a"]),
    ("gateway.apiKeys.keys", {"sk-not-tinker": "team"}),
    ("gateway.persistence.size", "lots"),
    ("gateway.bogus", True),
    ("operator.replicas", 0),
    ("operator.peering.name", "Not_A_Name"),
    ("trainer.gpus", 9),
    ("trainer.gpus", -1),
    ("trainer.tolerations", [{"key": "x", "operator": "Maybe"}]),
    ("trainer.nodeSelector", {"gpu": True}),
    ("trainer.checkpoints.hostPath", "relative/dir"),
    ("trainer.idleTimeoutSeconds", -5),
    ("trainer.cpu", "1Gi"),
    ("trainer.memory", "lots"),
    ("database.postgres.url", "mysql://x"),
    ("ingress.path", "no-slash"),
    ("metrics.serviceMonitor.interval", "often"),
])
def test_schema_rejects_bad_values(path: str, value: object) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_with(path, value), SCHEMA)


def test_trainer_cpu_and_memory_follow_the_crd_patterns(crd: dict) -> None:
    # The gateway copies them into each TrainingSession: a value the CRD refuses would fail every session.
    resources = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "resources"]["properties"]
    trainer = SCHEMA["properties"]["trainer"]["properties"]
    assert trainer["cpu"]["anyOf"][0]["pattern"] == resources["cpu"]["pattern"]
    assert trainer["memory"]["pattern"] == resources["memory"]["pattern"]


def test_helm_enforces_the_schema(helm: Helm) -> None:
    proc = helm.template("--set", "trainer.gpus=9", check=False)
    assert proc.returncode != 0 and "/trainer/gpus" in proc.stderr


def test_every_value_has_a_helm_docs_comment() -> None:
    """A key is either documented with `# --` (then everything under it is its value) or a section whose
    children are documented, as helm-docs reads them."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, skip_deeper_than = [], None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            continue
        indent = len(m[1])
        if skip_deeper_than is not None and indent > skip_deeper_than:
            continue  # part of a documented key's value
        skip_deeper_than = None
        if lines[i - 1].strip().startswith("# --"):
            skip_deeper_than = indent
            continue
        has_children = m[3].strip() == "" and i + 1 < len(lines) and lines[i + 1].startswith(m[1] + "  ")
        if not has_children:
            undocumented.append(f"{m[2]} (line {i + 1})")
    assert not undocumented, undocumented
