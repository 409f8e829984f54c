"""Emulated-cluster tier: SDK → gateway (backend=kubernetes) → TrainingSession → operator (kopf) → Pod →
test kubelet → real torchrun trainer process, all on this machine, no fixed ports.

The gateway is a real subprocess that finds the emulated API server through a kubeconfig (KUBECONFIG),
exactly as it would outside a cluster; the operator runs embedded in a thread; the kubelet runs each
Pod's container command as a local process group on its own loopback address.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
import yaml

from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet, KubeletConfig
from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway
from tinkerkube_operator.settings import OperatorSettings

TINY = "tinkerkube/tiny-qwen3"
NAMESPACE = "default"


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatedCluster]:
    with EmulatedCluster(namespaces=(NAMESPACE,)) as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: EmulatedCluster) -> Iterator[Api]:
    client = Api(cluster.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster") / "gateway"


@pytest.fixture(scope="module")
def kubelet(cluster: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubelet]:
    config = KubeletConfig(run_processes=True, log_dir=tmp_path_factory.mktemp("kubelet"))

    async def make() -> Kubelet:
        return Kubelet(cluster.url, config)

    k = cluster.run(make())
    cluster.submit(k.run())
    yield k
    cluster.run(k.stop(), timeout=60)


@pytest.fixture(scope="module")
def operator(cluster: EmulatedCluster, kubelet: Kubelet, state_dir: Path, tiny_model_dir: Path,
             model_cache_dir: Path) -> Iterator[OperatorProcess]:
    # The per-session path (each TrainingSession owns its pods), which test_full_chain.py is about; pool
    # binding, the default, runs in test_cluster_pools.py and test_operator_kill.py.
    with running_operator(cluster, operator_settings(cluster, state_dir, model_cache_dir, pools=False)) as proc:
        yield proc


def operator_settings(cluster: EmulatedCluster, state_dir: Path, model_cache_dir: Path,
                      **overrides: Any) -> OperatorSettings:
    """The tier's operator: embedded, fast reconciles, checkpoints on a host path; `overrides`: a module's own."""
    base: dict[str, Any] = dict(
        api_url=cluster.url, standalone=True, metrics_port=0, auth_token_secret=None, reconcile_interval_seconds=0.5,
        backoff_seconds=0.5, max_restarts=3, checkpoint_host_path=str((state_dir / "checkpoints").resolve()),
        model_cache_dir=str(model_cache_dir))
    return OperatorSettings(**{**base, **overrides})


@contextlib.contextmanager
def running_operator(cluster: EmulatedCluster, settings: OperatorSettings) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster, settings)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(cluster: EmulatedCluster, operator: OperatorProcess, state_dir: Path, model_cache_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    gw = start_kube_gateway(cluster, state_dir, model_cache_dir, tmp_path_factory.mktemp("kube"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=gateway.url, api_key=DEV_KEY) as c:
        yield c


def start_kube_gateway(cluster: EmulatedCluster, state_dir: Path, model_cache_dir: Path, kube_dir: Path,
                       **extra_env: str) -> GatewayProc:
    """A gateway with the kubernetes backend, reaching the emulated cluster through a kubeconfig in `kube_dir`;
    `extra_env`: more TINKERKUBE_GATEWAY_* settings."""
    kubeconfig = kube_dir / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": cluster.url}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}],
    }))
    env = {"TINKERKUBE_GATEWAY_BACKEND": "kubernetes", "KUBECONFIG": str(kubeconfig),
           "TINKERKUBE_GATEWAY_TRAINER_START_TIMEOUT_SECONDS": "240", **extra_env}
    return start_gateway(state_dir, model_cache_dir=model_cache_dir, real_trainer=True, extra_env=env)
