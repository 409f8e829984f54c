"""tests/support/podman.py: how the image tier's kubelet turns a Pod into `podman run` (no podman needed here).

What it must keep from the pod spec is what the image tier exists to check: the read-only root without
podman's convenience tmpfs mounts, the user, the dropped capabilities, and only the declared volumes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.support import podman
from tinkerkube_contract.resource import TrainingSessionSpec
from tinkerkube_operator import manifests
from tinkerkube_operator.manifests import PodConfig, SessionRef


def _trainer_pod() -> dict:
    spec = TrainingSessionSpec(base_model="tiny", model_id="m:train:0", owner="t")
    return manifests.pod(SessionRef("s", "ns"), spec, PodConfig(image="reg/trainer:1", shm_size="2Gi"), 0)


def _argv(pod: dict, tmp_path: Path) -> list[str]:
    container = pod["spec"]["containers"][0]
    local = {}
    for m in container["volumeMounts"]:
        local[m["mountPath"]] = str(tmp_path / m["name"])
        Path(local[m["mountPath"]]).mkdir()
    mounts = podman.volume_mounts(pod["spec"], container, local)
    return podman.run_argv(pod["spec"], container, name="c1", mounts=mounts, env_names=["A_TOKEN"])


def test_the_operators_trainer_pod_keeps_its_security_context(tmp_path: Path) -> None:
    argv = _argv(_trainer_pod(), tmp_path)
    assert argv[:2] == ["podman", "run"] and "--network=host" in argv and "--pull=never" in argv
    # Read-only with nothing writable but the volumes: podman's default tmpfs on /tmp, /run is switched off.
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert "--user=10001:10001" in argv and "--group-add=10001" in argv
    assert "--cap-drop=all" in argv and "--security-opt=no-new-privileges" in argv


def test_volumes_map_to_mounts_at_their_paths(tmp_path: Path) -> None:
    argv = _argv(_trainer_pod(), tmp_path)
    pairs = list(itertools.pairwise(argv))
    assert ("--tmpfs", "/dev/shm:rw:size=2g") in pairs  # medium Memory, sized by its sizeLimit
    assert ("-v", f"{tmp_path / 'tmp'}:/tmp:rw") in pairs
    assert ("-v", f"{tmp_path / 'checkpoints'}:/checkpoints:rw") in pairs
    assert (tmp_path / "tmp").stat().st_mode & 0o777 == 0o777  # an emptyDir: anyone may write


def test_command_replaces_the_entrypoint_and_env_travels_by_name_only(tmp_path: Path) -> None:
    pod = _trainer_pod()
    argv = _argv(pod, tmp_path)
    command = pod["spec"]["containers"][0]["command"]
    assert f"--entrypoint={json.dumps(command)}" in argv
    assert argv[-1] == "reg/trainer:1"  # no args: the image runs the entrypoint alone
    assert ("-e", "A_TOKEN") in list(itertools.pairwise(argv))
    assert not any("=" in a and a.startswith("A_TOKEN") for a in argv)


def test_run_as_non_root_without_a_user_is_refused() -> None:
    pod_spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": 0}}
    with pytest.raises(podman.PodRefused):
        podman.run_argv(pod_spec, {"image": "i"}, name="c", mounts=[], env_names=[])


def test_kubernetes_quantities_become_tmpfs_sizes() -> None:
    assert [podman.tmpfs_size(q) for q in ("1Gi", "512Mi", "64M", "100", None)] == ["1g", "512m", "64m", "100", None]
