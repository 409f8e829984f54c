"""tests/kind/e2e.sh's control flow, run here with stand-in docker/kind/kubectl/helm/curl/python that only
record their arguments: the steps happen in order, the cluster is always deleted, and a failure collects
diagnostics and fails the script. (What the real tools do is the real kind run's job.)"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "kind" / "e2e.sh"

STUB = """#!/usr/bin/env bash
echo "{name} $*" >> "$E2E_CALLS"
case "{name} $*" in
  "kind get nodes"*) echo tinkerkube-e2e-control-plane ;;
  "kubectl -n tinkerkube get ts --watch"*) printf 'ts-a Ready\\nts-b Pending\\nts-b Ready\\n' ;;
  "kubectl -n tinkerkube get pods -o name"*) echo pod/tinkerkube-gateway-1 ;;
  "python -c import tinker") exit 0 ;;
  "python -c import socket"*) echo 40123 ;;
  "python tests/kind/sdk_smoke.py"*) echo "SDK smoke passed"; exit "${{SMOKE_EXIT:-0}}" ;;
esac
exit 0
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "kind", "kubectl", "helm", "curl", "python"):
        path = bin_dir / name
        path.write_text(STUB.format(name=name))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path: Path, **extra_env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = _stubs(tmp_path)
    calls = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "E2E_CALLS": str(calls),
           "PYTHON": str(bin_dir / "python"), "E2E_ARTIFACTS": str(tmp_path / "artifacts"),
           "E2E_WORKDIR": str(tmp_path / "work"), **extra_env}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    lines = [line.replace(str(bin_dir) + "/", "") for line in calls.read_text().splitlines()]
    return proc, lines


def _index(lines: list[str], prefix: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))


@pytest.fixture(autouse=True)
def _clean_var() -> None:
    os.makedirs(ROOT / "var", exist_ok=True)


def test_the_steps_run_in_order_and_the_cluster_is_deleted(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED: kind e2e" in proc.stdout
    order = ["kind create cluster --name tinkerkube-e2e --config kind-config.yaml",
             "docker build -f api_gateway/Dockerfile -t tinkerkube/gateway:local",
             "docker build -f operator/Dockerfile -t tinkerkube/operator:local",
             "docker build -f trainer_pod/Dockerfile --build-arg VARIANT=cpu -t tinkerkube/trainer:local-cpu",
             "kind load docker-image --name tinkerkube-e2e tinkerkube/trainer:local-cpu",
             "kubectl apply --server-side -f crds/",
             "helm upgrade --install tinkerkube charts/tinkerkube -n tinkerkube -f charts/tinkerkube/ci/kind-values",
             "python tests/kind/sdk_smoke.py"]
    positions = [_index(calls, step) for step in order]
    assert positions == sorted(positions), calls
    assert calls[-1] == "kind delete cluster --name tinkerkube-e2e"


def test_a_failing_smoke_run_collects_diagnostics_and_fails(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, SMOKE_EXIT="3")
    assert proc.returncode == 3
    assert "FAILED: kind e2e (exit 3)" in proc.stdout
    artifacts = {p.name for p in (tmp_path / "artifacts").iterdir()}
    assert {"trainingsessions.yaml", "describe-pods.txt", "events.txt", "logs-tinkerkube-gateway-1.txt"} <= artifacts
    assert calls[-1] == "kind delete cluster --name tinkerkube-e2e"


def test_port_forward_mode_needs_no_ingress(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, E2E_INGRESS="port-forward")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any("ingress-nginx" in c and c.startswith("kubectl apply") for c in calls)
    assert any(c.startswith("kubectl -n tinkerkube port-forward svc/tinkerkube-gateway 40123:80") for c in calls)
    assert any("--set ingress.enabled=false" in c for c in calls)
