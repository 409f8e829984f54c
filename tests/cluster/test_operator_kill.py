"""The operator SIGKILLed mid-training (issue 9's fault tier, with trainer pools): the operator is a real
process here (`python -m tinkerkube_operator.main`), killed with SIGKILL while a run's ops are in flight.
The pool keeps serving (the operator is not on the data path), every future resolves, the run's losses equal
an uninterrupted twin's (another tenant, another pool), and the restarted operator takes the objects over
as they are: the same binding, the same pool pod, no second pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker

from tests.cluster.conftest import NAMESPACE, start_kube_gateway
from tests.cluster.test_cluster_pools import KEYS, batch, new_run, pool_of, submit
from tests.support.kmock_cluster import REPO, Api, EmulatedCluster
from tests.support.kubelet import Kubelet
from tests.support.sdk import GatewayProc
from tinkerkube_contract.resource import LABEL_POOL, PLURAL, POOL_PLURAL

pytestmark = pytest.mark.slow
STEPS = 6
KILL_AT = 2
RESTART_AT = 4
SEED = 11


class OperatorSubprocess:
    """The operator as its own OS process, so that a SIGKILL is a real one."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tinkerkube_operator.main"], cwd=REPO,
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def operator(cluster: EmulatedCluster, kubelet: Kubelet, state_dir: Path, tiny_model_dir: Path,
             model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorSubprocess]:
    prefix = "TINKERKUBE_OPERATOR_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update({f"{prefix}{k}": v for k, v in {
        "API_URL": cluster.url, "STANDALONE": "true", "METRICS_PORT": "0", "AUTH_TOKEN_SECRET": "",
        "RECONCILE_INTERVAL_SECONDS": "0.5", "BACKOFF_SECONDS": "0.5", "POOLS": "true", "POOL_MAX_RUNS": "2",
        "POOL_IDLE_TIMEOUT_SECONDS": "0", "CHECKPOINT_HOST_PATH": str((state_dir / "checkpoints").resolve()),
        "MODEL_CACHE_DIR": str(model_cache_dir), "NAMESPACES": f'["{NAMESPACE}"]'}.items()})
    proc = OperatorSubprocess(env, tmp_path_factory.mktemp("operator") / "operator.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(cluster: EmulatedCluster, operator: OperatorSubprocess, state_dir: Path, model_cache_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    gw = start_kube_gateway(cluster, state_dir, model_cache_dir, tmp_path_factory.mktemp("kube"),
                            TINKERKUBE_GATEWAY_API_KEYS=KEYS)
    yield gw
    gw.stop()


def _train(run: tinker.TrainingClient, fault: dict[int, Any] | None = None) -> list[float]:
    losses = []
    for step in range(STEPS):
        fb, opt = submit(run, step, SEED)
        if fault and step in fault:
            fault[step]()
        losses.append(fb.result(timeout=300).metrics["loss:sum"])
        opt.result(timeout=300)
    return losses


def test_a_sigkilled_operator_loses_no_future_and_changes_no_math(
        gateway: GatewayProc, operator: OperatorSubprocess, api: Api) -> None:
    twin = _train(new_run(gateway, "tml-twin", SEED))
    victim = new_run(gateway, "tml-victim", SEED)
    pool = pool_of(api, victim.model_id)
    (pod,) = api.list("pods", NAMESPACE, **{LABEL_POOL: pool})
    pools_before = {p["metadata"]["name"] for p in api.list(POOL_PLURAL, NAMESPACE)}
    try:
        losses = _train(victim, {KILL_AT: operator.kill, RESTART_AT: operator.start})
    except Exception as exc:
        raise AssertionError(f"{exc!r}\noperator log:\n{operator.log()[-3000:]}\n"
                             f"gateway log:\n{gateway.log()[-3000:]}") from exc
    assert losses == pytest.approx(twin, rel=1e-5)
    # The restarted operator took over what it found: same binding, same pod, no new pool.
    session = next(s for s in api.list(PLURAL, NAMESPACE) if s["spec"]["modelId"] == victim.model_id)
    assert session["status"]["pool"] == pool and session["status"]["phase"] == "Ready"
    assert [p["metadata"]["name"] for p in api.list("pods", NAMESPACE, **{LABEL_POOL: pool})] == \
        [pod["metadata"]["name"]]
    assert {p["metadata"]["name"] for p in api.list(POOL_PLURAL, NAMESPACE)} == pools_before
    # And it works: a new run of the tenant is bound by the restarted operator to the pool with room.
    second = new_run(gateway, "tml-victim", SEED + 1)
    assert pool_of(api, second.model_id) == pool
    assert second.forward(batch(0, SEED), "cross_entropy").result(timeout=120).metrics["loss:sum"] > 0
