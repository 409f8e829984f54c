"""The operator as deployed: `kopf run -m tinkerkube_operator.main` and `python -m tinkerkube_operator.main`
as real subprocesses configured only by TINKERKUBE_OPERATOR_* variables, and peering between replicas (one
leader reconciles and refills warm pools; the others stand by)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.component.operator.conftest import session_body
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster
from tests.support.kubelet import Kubelet
from tinkerkube_contract.resource import PLURAL, POOL_PLURAL

REPO = Path(__file__).resolve().parents[3]


def _spawn(argv: list[str], cluster: EmulatedCluster, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {**os.environ, "TINKERKUBE_OPERATOR_API_URL": cluster.url, "TINKERKUBE_OPERATOR_METRICS_PORT": "0",
            "TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET": "", "TINKERKUBE_OPERATOR_RECONCILE_INTERVAL_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("crds", "operator")), **env}
    log = open(tmp_path / f"operator-{len(list(tmp_path.iterdir()))}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(argv, env=full, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _ready(api: Api, ns: str, name: str) -> None:
    eventually_sync(lambda: ((api.get(PLURAL, ns, name) or {}).get("status") or {}).get("phase"),
                    lambda p: p == "Ready", timeout=60, what=f"{name} Ready")


def test_kopf_run_module_entrypoint_reconciles(cluster: EmulatedCluster, api: Api, namespace: str, kubelet: Kubelet,
                                               tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    kopf = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m", "tinkerkube_operator.main"]
    processes.append(_spawn(kopf, cluster, tmp_path))
    api.create(PLURAL, namespace, session_body("via-kopf-run"))
    _ready(api, namespace, "via-kopf-run")


def test_python_module_entrypoint_runs_standalone(cluster: EmulatedCluster, api: Api, namespace: str,
                                                  kubelet: Kubelet, tmp_path: Path,
                                                  processes: list[subprocess.Popen[bytes]]) -> None:
    processes.append(_spawn([sys.executable, "-m", "tinkerkube_operator.main"], cluster, tmp_path,
                            TINKERKUBE_OPERATOR_STANDALONE="true"))
    api.create(PLURAL, namespace, session_body("via-main"))
    _ready(api, namespace, "via-main")


def test_replicas_elect_one_leader_and_fail_over(cluster: EmulatedCluster, api: Api, namespace: str,
                                                 kubelet: Kubelet, tmp_path: Path,
                                                 processes: list[subprocess.Popen[bytes]]) -> None:
    cluster.add_peering("tinkerkube")
    main = [sys.executable, "-m", "tinkerkube_operator.main"]
    for priority in ("10", "20"):
        processes.append(_spawn(main, cluster, tmp_path, TINKERKUBE_OPERATOR_PEERING_PRIORITY=priority))
    peers = eventually_sync(lambda: (api.http.get("/apis/kopf.dev/v1/clusterkopfpeerings/tinkerkube").json()
                                     .get("status") or {}), lambda s: len(s) == 2, timeout=30, what="two peers")
    assert sorted(p["priority"] for p in peers.values()) == [10, 20]
    time.sleep(2.0)  # let the follower process the leader's keep-alive and pause
    api.create(PLURAL, namespace, session_body("led"))
    _ready(api, namespace, "led")
    handled = "Handler 'session_changed' succeeded"
    assert handled in (tmp_path / "operator-1.log").read_text()  # the leader (priority 20) did the work
    assert handled not in (tmp_path / "operator-0.log").read_text()  # the follower stood by
    processes[1].terminate()  # the leader goes away
    processes[1].wait(15)
    api.create(PLURAL, namespace, session_body("after-failover"))
    _ready(api, namespace, "after-failover")
    restarts = ((api.get(PLURAL, namespace, "led") or {}).get("status") or {}).get("restarts")
    assert restarts == 0  # the new leader adopted the running pod set instead of recreating it


def _log(tmp_path: Path, index: int) -> str:
    return (tmp_path / f"operator-{index}.log").read_text(errors="replace")


def _warm(api: Api, ns: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list(POOL_PLURAL, ns) if not p["spec"].get("owner"))


def test_only_the_peering_leader_refills_warm_pools(cluster: EmulatedCluster, api: Api, namespace: str,
                                                    kubelet: Kubelet, tmp_path: Path,
                                                    processes: list[subprocess.Popen[bytes]]) -> None:
    cluster.add_peering("tinkerkube")
    main = [sys.executable, "-m", "tinkerkube_operator.main"]
    warm = {"TINKERKUBE_OPERATOR_WARM_POOLS": json.dumps({"tinkerkube/tiny-qwen3": 1}),
            "TINKERKUBE_OPERATOR_WARM_POOLS_NAMESPACE": namespace}
    leads, stands_by, created = "this replica leads the refill", "standing by", "created warm pool"
    # The leader first (operator-0.log), so that the follower never sees a moment without it.
    processes.append(_spawn(main, cluster, tmp_path, TINKERKUBE_OPERATOR_PEERING_PRIORITY="20", **warm))
    first = eventually_sync(lambda: _warm(api, namespace), lambda w: len(w) == 1, timeout=60, what="a warm pool")
    processes.append(_spawn(main, cluster, tmp_path, TINKERKUBE_OPERATOR_PEERING_PRIORITY="10", **warm))
    eventually_sync(lambda: _log(tmp_path, 1), lambda text: stands_by in text, timeout=60,
                    what="the follower standing by")
    # A tenant claims the warm pool: one replacement, created by the leader alone.
    api.create(PLURAL, namespace, session_body("claims"))
    _ready(api, namespace, "claims")
    assert ((api.get(PLURAL, namespace, "claims") or {}).get("status") or {}).get("pool") == first[0]
    eventually_sync(lambda: _warm(api, namespace), lambda w: len(w) == 1 and w != first, timeout=30,
                    what="the claimed warm pool replaced")
    assert _log(tmp_path, 0).count(created) == 2 and leads in _log(tmp_path, 0)
    assert created not in _log(tmp_path, 1) and leads not in _log(tmp_path, 1)
    assert len(api.list(POOL_PLURAL, namespace)) == 2  # the claimed one and its replacement, no duplicate
    # The leader goes: the follower takes the refill over.
    processes[0].terminate()
    processes[0].wait(15)
    eventually_sync(lambda: _log(tmp_path, 1), lambda text: leads in text, timeout=60, what="the new leader")
    second = _warm(api, namespace)
    api.create(PLURAL, namespace, session_body("claims-again", owner="tenant-b"))
    _ready(api, namespace, "claims-again")
    eventually_sync(lambda: _warm(api, namespace), lambda w: len(w) == 1 and w != second, timeout=30,
                    what="the second claim replaced")
    assert _log(tmp_path, 1).count(created) == 1
