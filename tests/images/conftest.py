"""Image tier: the real images (built by `make images-test` from the real Dockerfiles, tests/images/build.sh)
run the way a cluster runs them.

A kmock API server (tests/support/kmock_cluster.py) plays the cluster and the test kubelet in podman mode
plays the node: every Pod becomes a `podman run --network=host` of its own image, with the pod's user,
read-only root, dropped capabilities and volumes, and nothing else writable (tests/support/podman.py).
The gateway and operator Pods are the chart's own Deployments, trainer Pods the operator's.

`make images-test` names the images in TINKERKUBE_TEST_IMAGE_{GATEWAY,OPERATOR,TRAINER}; without them
(a plain `make test`) the tier skips, saying how to run it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import podman
from tests.support.kmock_cluster import Api, EmulatedCluster
from tests.support.kubelet import Kubelet, KubeletConfig

NAMESPACE = "tinkerkube"  # the chart tier's release namespace (tests/chart/conftest.py)
TRAINER_UID = 10001  # the images' user, and the chart's/operator's runAsUser
ENV = "TINKERKUBE_TEST_IMAGE_"


@dataclass(frozen=True)
class Images:
    gateway: str
    operator: str
    trainer: str


@pytest.fixture(scope="session")
def images() -> Iterator[Images]:
    names = {c: os.environ.get(ENV + c.upper(), "") for c in ("gateway", "operator", "trainer")}
    if not all(names.values()):
        pytest.skip("image tier: run `make images-test` (builds the images with podman, then runs this tier)")
    why = podman.podman_usable()
    if why:
        pytest.fail(why)
    missing = [name for name in names.values() if not podman.image_exists(name)]
    if missing:
        pytest.fail(f"images not built: {missing} (tests/images/build.sh builds them)")
    podman.remove_labelled()  # containers left by an interrupted run
    yield Images(**names)
    podman.remove_labelled()


@pytest.fixture(scope="session")
def cluster(images: Images) -> Iterator[EmulatedCluster]:
    with EmulatedCluster(namespaces=(NAMESPACE,)) as c:
        yield c


@pytest.fixture(scope="session")
def api(cluster: EmulatedCluster) -> Iterator[Api]:
    client = Api(cluster.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def kubelet(cluster: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubelet]:
    config = KubeletConfig(podman=True, log_dir=tmp_path_factory.mktemp("kubelet"), grace_seconds=10)

    async def make() -> Kubelet:
        return Kubelet(cluster.url, config)

    k = cluster.run(make())
    cluster.submit(k.run())
    yield k
    cluster.run(k.stop(), timeout=120)


@pytest.fixture(scope="session")
def checkpoint_host_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The checkpoint hostPath the gateway and the trainers share; owned by their uid, as tests/kind/e2e.sh
    prepares it on the kind node (Kubernetes does not chown hostPath volumes)."""
    path = tmp_path_factory.mktemp("node") / "checkpoints"
    path.mkdir()
    os.chown(path, TRAINER_UID, TRAINER_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pod_status(api: Api, name: str) -> dict:
    pod = api.get("pods", NAMESPACE, name) or {}
    return pod.get("status") or {}


def is_ready(status: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def wait_ready(api: Api, kubelet: Kubelet, name: str, *, timeout: float = 180) -> dict:
    """The pod's status once Ready; fails at once (with the container's log) when it terminates."""
    deadline = time.monotonic() + timeout
    while True:
        status = pod_status(api, name)
        if status.get("phase") in ("Failed", "Succeeded"):
            pytest.fail(f"pod {name} ended: {status}\n{kubelet.logs(NAMESPACE, name)[-4000:]}")
        if is_ready(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"pod {name} not Ready within {timeout}s: {status}\n{kubelet.logs(NAMESPACE, name)[-4000:]}")
        time.sleep(0.5)


def container_of(kubelet: Kubelet, pod_name: str) -> dict:
    """`podman container inspect` of the container the kubelet runs for this pod."""
    rp = kubelet.pods[(NAMESPACE, pod_name)]
    assert rp.container_name, f"{pod_name} is not a podman container"
    found = podman.inspect_container(rp.container_name)
    assert found is not None, f"no container {rp.container_name}"
    return found
