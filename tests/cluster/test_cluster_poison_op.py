"""A poison op on a shared TrainerPool on the emulated cluster (real SDK, real torchrun trainers as
processes, tiny model): the test SIGKILLs the pool's worker while a chosen large forward_backward is in the
pass (seen in the pool's pass journal on its checkpoint store), then again when the pod that replaced it
runs it alone. The op then fails with `op_crashed_trainer`, the run goes on and its math equals a twin
that never had that op, the run sharing the pool is unaffected, and the pool (restart budget 3) is Ready."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
from tinker.types import RequestErrorCategory

from tests.cluster.conftest import NAMESPACE, operator_settings, running_operator, start_kube_gateway
from tests.cluster.test_cluster_pools import new_run, pool_of, pool_runs, submit
from tests.faults.test_poison_op import kill_when, poison
from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet
from tests.support.sdk import GatewayProc
from tinkerkube_contract.resource import LABEL_POOL, POOL_PLURAL

pytestmark = pytest.mark.slow
KEYS = '{"tml-alice": "alice", "tml-twin": "twin"}'
SEED = 11


@pytest.fixture(scope="module")
def operator(cluster: EmulatedCluster, kubelet: Kubelet, state_dir: Path, tiny_model_dir: Path,
             model_cache_dir: Path) -> Iterator[OperatorProcess]:
    settings = operator_settings(cluster, state_dir, model_cache_dir, pools=True, pool_max_runs=2,
                                 pool_idle_timeout_seconds=0)
    with running_operator(cluster, settings) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(cluster: EmulatedCluster, operator: OperatorProcess, state_dir: Path, model_cache_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    gw = start_kube_gateway(cluster, state_dir, model_cache_dir, tmp_path_factory.mktemp("kube"),
                            TINKERKUBE_GATEWAY_API_KEYS=KEYS, TINKERKUBE_GATEWAY_TRAINER_AUTO_CHECKPOINT_STEPS="2",
                            TINKERKUBE_GATEWAY_TRAINER_REQUEST_TIMEOUT_SECONDS="10")
    yield gw
    gw.stop()


def train(client: tinker.TrainingClient, steps: range) -> list[float]:
    losses = []
    for step in steps:
        fb, opt = submit(client, step, SEED)
        losses.append(fb.result(timeout=300).metrics["loss:sum"])
        opt.result(timeout=300)
    return losses


def running(state_dir: Path, pool: str) -> list[list[object]]:
    """The ops of the pass the pool is running, from its journal (named by the pool, not its pods)."""
    path = state_dir / "checkpoints" / ".pass-journal" / f"pool-{NAMESPACE}-{pool}.json"
    try:
        return list(json.loads(path.read_text())["running"])
    except (OSError, ValueError):
        return []


def kill_pods(api: Api, kubelet: Kubelet, pool: str) -> None:
    """SIGKILL the worker of each of the pool's live pods."""
    for pod in api.list("pods", NAMESPACE, **{LABEL_POOL: pool}):
        if not pod["metadata"].get("deletionTimestamp"):
            kubelet.kill_worker(NAMESPACE, pod["metadata"]["name"])


def test_an_op_that_kills_its_pool_pod_twice_fails_alone(gateway: GatewayProc, api: Api, kubelet: Kubelet,
                                                          state_dir: Path) -> None:
    twin = train(new_run(gateway, "tml-twin", SEED), range(4))
    victim, bystander = new_run(gateway, "tml-alice", SEED), new_run(gateway, "tml-alice", SEED)
    pool = pool_of(api, victim.model_id)
    assert pool_of(api, bystander.model_id) == pool  # one shared pool
    assert train(victim, range(2)) == pytest.approx(twin[:2], rel=1e-5)
    assert train(bystander, range(1)) == pytest.approx(twin[:1], rel=1e-5)
    bad = victim.forward_backward(poison(), "cross_entropy")
    journal, kill = (lambda: running(state_dir, pool)), (lambda: kill_pods(api, kubelet, pool))
    op = kill_when(journal, kill, victim.model_id)
    kill_when(journal, kill, victim.model_id, seen=[op])  # replayed alone on the pod that replaced it: again
    with pytest.raises(tinker.RequestFailedError, match="op_crashed_trainer") as failed:
        bad.result(timeout=600)
    assert failed.value.category is RequestErrorCategory.User
    assert train(victim, range(2, 4)) == pytest.approx(twin[2:], rel=1e-5)
    assert train(bystander, range(1, 4)) == pytest.approx(twin[1:], rel=1e-5)  # re-attached, unaffected
    status = (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["status"]
    assert status["restarts"] == 2 and status["phase"] == "Ready"
    assert sorted(pool_runs(api, pool)) == sorted([victim.model_id, bystander.model_id])
