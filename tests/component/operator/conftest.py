"""Operator component tier: the real operator under kopf against the kmock emulator, pods "run" by the
test kubelet in fake mode (Running/Ready at once; failures injected)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet, KubeletConfig
from tinkerkube_contract.resource import API_VERSION, KIND
from tinkerkube_operator.settings import OperatorSettings


@pytest.fixture
def cluster() -> Iterator[EmulatedCluster]:
    with EmulatedCluster() as c:
        yield c


@pytest.fixture
def namespace(cluster: EmulatedCluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.add_namespace(name)
    return name


@pytest.fixture
def api(cluster: EmulatedCluster) -> Iterator[Api]:
    client = Api(cluster.url)
    yield client
    client.close()


@pytest.fixture
def kubelet_config() -> KubeletConfig:
    return KubeletConfig(run_processes=False, crash_images={"crash:latest"}, pull_fail_images={"nope:latest"})


@pytest.fixture
def kubelet(cluster: EmulatedCluster, kubelet_config: KubeletConfig) -> Iterator[Kubelet]:
    async def make() -> Kubelet:
        return Kubelet(cluster.url, kubelet_config)

    k = cluster.run(make())
    cluster.submit(k.run())
    yield k
    cluster.run(k.stop())


@pytest.fixture
def operator_settings(cluster: EmulatedCluster) -> OperatorSettings:
    """The per-session path (pools=False: each session owns its pod set), which these lifecycle and backend
    tests are about; pool binding, the default, has its own settings in test_pool_binding.py."""
    return OperatorSettings(
        api_url=cluster.url, standalone=True, metrics_port=0, reconcile_interval_seconds=0.3,
        backoff_seconds=0.2, backoff_max_seconds=1.0, max_restarts=2, unschedulable_timeout_seconds=1.5,
        image_pull_timeout_seconds=1.5, auth_token_secret=None, trainer_image="trainer:test", pools=False,
    )


@pytest.fixture
def operator(cluster: EmulatedCluster, kubelet: Kubelet,
             operator_settings: OperatorSettings) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster, operator_settings)
    proc.start()
    yield proc
    proc.stop()


def session_body(name: str, **spec: Any) -> dict[str, Any]:
    base = {"baseModel": "tinkerkube/tiny-qwen3", "modelId": f"s1:train:{name}", "owner": "tenant-a"}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": {**base, **spec}}
