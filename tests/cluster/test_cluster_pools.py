"""Trainer pools on the emulated cluster, end to end through the real SDK and real torchrun trainers (tiny
model): several runs of one tenant on one TrainerPool (a warm pool it claimed, refilled by the operator),
that pool's pod killed with both runs on it and both continuing with losses identical to uninterrupted
twins (another tenant, so another pool), a deleted TrainingSession detached from its pool, a deleted pool's
run recovering on a new pool with its math unchanged, and a run over its tenant's limit waiting
(`paused_capacity` on its future) until a slot frees up. The tests run in file order on the same runs."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.cluster.conftest import NAMESPACE, TINY, operator_settings, running_operator, start_kube_gateway
from tests.support import gateway_raw as raw
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet
from tests.support.sdk import GatewayProc
from tinkerkube_contract import pod_api
from tinkerkube_contract.resource import ANNOTATION_MODEL_ID, LABEL_POOL, LABEL_SESSION, PLURAL, POOL_PLURAL

pytestmark = pytest.mark.slow
KEYS = '{"tml-victim": "victim", "tml-twin": "twin"}'
SEEDS = (11, 12)
STEPS = 4
KILL_AT = 2


@pytest.fixture(scope="module")
def operator(cluster: EmulatedCluster, kubelet: Kubelet, state_dir: Path, tiny_model_dir: Path,
             model_cache_dir: Path) -> Iterator[OperatorProcess]:
    settings = operator_settings(cluster, state_dir, model_cache_dir, pools=True, pool_max_runs=2,
                                 pool_idle_timeout_seconds=0, max_runs_per_tenant=2, warm_pools={TINY: 1},
                                 warm_pools_namespace=NAMESPACE)
    with running_operator(cluster, settings) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(cluster: EmulatedCluster, operator: OperatorProcess, state_dir: Path, model_cache_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    gw = start_kube_gateway(cluster, state_dir, model_cache_dir, tmp_path_factory.mktemp("kube"),
                            TINKERKUBE_GATEWAY_API_KEYS=KEYS,
                            TINKERKUBE_GATEWAY_TRAINER_REQUEST_TIMEOUT_SECONDS="10")
    yield gw
    gw.stop()


def batch(step: int, seed: int) -> list[types.Datum]:
    out = []
    for i in range(3):
        tokens = [(step * 37 + i * 11 + j * 5 + seed) % 350 + 3 for j in range(9 + i)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
    return out


def submit(client: tinker.TrainingClient, step: int, seed: int) -> tuple[Future[Any], Future[Any]]:
    return (client.forward_backward(batch(step, seed), "cross_entropy"),
            client.optim_step(types.AdamParams(learning_rate=0.05)))


def new_run(gw: GatewayProc, key: str, seed: int) -> tinker.TrainingClient:
    service = tinker.ServiceClient(base_url=gw.url, api_key=key)
    return service.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result(timeout=300)


def session_of(api: Api, model_id: str) -> dict[str, Any]:
    (obj,) = [s for s in api.list(PLURAL, NAMESPACE)
              if s["metadata"].get("annotations", {}).get(ANNOTATION_MODEL_ID) == model_id]
    return obj


def pool_of(api: Api, model_id: str) -> str:
    return str(session_of(api, model_id)["status"]["pool"])


def pool_runs(api: Api, pool: str) -> list[str]:
    """What the pool's trainer itself says it holds (its pod API)."""
    url = (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["status"]["endpoint"]["url"]
    return list(httpx.get(url + pod_api.INFO_PATH, timeout=10).json()["runs"])


@pytest.fixture(scope="module")
def twins(gateway: GatewayProc) -> list[list[float]]:
    """The uninterrupted twins' losses, one list per seed."""
    runs = [new_run(gateway, "tml-twin", seed) for seed in SEEDS]
    losses: list[list[float]] = [[] for _ in SEEDS]
    for step in range(STEPS):
        futures = [submit(run, step, seed) for run, seed in zip(runs, SEEDS, strict=True)]
        for i, (fb, opt) in enumerate(futures):
            losses[i].append(fb.result(timeout=300).metrics["loss:sum"])
            opt.result(timeout=300)
    return losses


@pytest.fixture(scope="module")
def victims(gateway: GatewayProc, twins: list[list[float]]) -> list[tinker.TrainingClient]:
    return [new_run(gateway, "tml-victim", seed) for seed in SEEDS]


def test_several_runs_of_a_tenant_share_one_pool_and_tenants_do_not(
        victims: list[tinker.TrainingClient], twins: list[list[float]], api: Api) -> None:
    (pool,) = {pool_of(api, v.model_id) for v in victims}
    spec = (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["spec"]
    assert spec["owner"] == "victim" and spec["baseModel"] == TINY
    assert pool.startswith("warm-")  # claimed: the tenant's first run attached to a pool that was already up
    eventually_sync(lambda: [p["metadata"]["name"] for p in api.list(POOL_PLURAL, NAMESPACE)
                             if not p["spec"].get("owner")], lambda warm: len(warm) == 1 and pool not in warm,
                    timeout=60, what="the claimed warm pool replaced")
    assert sorted(pool_runs(api, pool)) == sorted(v.model_id for v in victims)
    assert len(api.list("pods", NAMESPACE, **{LABEL_POOL: pool})) == 1
    assert all(api.list("pods", NAMESPACE, **{LABEL_SESSION: session_of(api, v.model_id)["metadata"]["name"]}) == []
               for v in victims)
    twin_pools = {p["metadata"]["name"] for p in api.list(POOL_PLURAL, NAMESPACE) if p["spec"]["owner"] == "twin"}
    assert len(twin_pools) == 1 and pool not in twin_pools
    assert session_of(api, victims[0].model_id)["status"]["endpoint"] == \
        (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["status"]["endpoint"]


def test_a_killed_pool_pod_loses_no_future_and_changes_no_math(
        victims: list[tinker.TrainingClient], twins: list[list[float]], api: Api, kubelet: Kubelet,
        gateway: GatewayProc) -> None:
    pool = pool_of(api, victims[0].model_id)
    (pod,) = api.list("pods", NAMESPACE, **{LABEL_POOL: pool})
    losses: list[list[float]] = [[] for _ in SEEDS]
    for step in range(STEPS):
        futures = [submit(run, step, seed) for run, seed in zip(victims, SEEDS, strict=True)]
        if step == KILL_AT:
            kubelet.kill_worker(NAMESPACE, pod["metadata"]["name"])
        try:
            for i, (fb, opt) in enumerate(futures):
                losses[i].append(fb.result(timeout=300).metrics["loss:sum"])
                opt.result(timeout=300)
        except Exception as exc:  # keep the evidence
            raise AssertionError(f"{exc!r}\npool: {api.get(POOL_PLURAL, NAMESPACE, pool)}\n"
                                 f"gateway log:\n{gateway.log()[-4000:]}") from exc
    for got, want in zip(losses, twins, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    status = (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["status"]
    assert status["restarts"] == 1 and status["phase"] == "Ready"
    assert [p["metadata"]["name"] for p in api.list("pods", NAMESPACE, **{LABEL_POOL: pool})] == [f"{pool}-g1-0"]
    assert sorted(pool_runs(api, pool)) == sorted(v.model_id for v in victims)


def test_deleting_a_training_session_detaches_its_run(victims: list[tinker.TrainingClient], api: Api) -> None:
    gone = victims[1]
    pool = pool_of(api, gone.model_id)
    assert api.delete(PLURAL, NAMESPACE, session_of(api, gone.model_id)["metadata"]["name"]) == 200
    eventually_sync(lambda: pool_runs(api, pool), lambda runs: runs == [victims[0].model_id], timeout=30,
                    what="the run detached from its pool")
    eventually_sync(lambda: (api.get(POOL_PLURAL, NAMESPACE, pool) or {}).get("status", {}).get("runsUsed"),
                    lambda used: used == 1, timeout=30, what="the pool counts one run")


def test_a_deleted_pool_s_run_recovers_on_a_new_pool_with_its_math(
        victims: list[tinker.TrainingClient], api: Api, gateway: GatewayProc) -> None:
    run = victims[0]
    probe = batch(99, 0)
    before = run.forward(probe, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    old = pool_of(api, run.model_id)
    assert api.delete(POOL_PLURAL, NAMESPACE, old) == 200
    eventually_sync(lambda: session_of(api, run.model_id)["status"],
                    lambda s: s.get("pool") not in (None, old) and s.get("phase") == "Ready", timeout=120,
                    what="bound to a new pool")
    try:
        after = run.forward(probe, "cross_entropy").result(timeout=300).metrics["loss:sum"]
    except Exception as exc:
        raise AssertionError(f"{exc!r}\ngateway log:\n{gateway.log()[-4000:]}") from exc
    assert after == pytest.approx(before, rel=1e-5)

    def served_by_its_pool() -> list[str]:
        # Each probe is an op: if the new pool's pod was restarted meanwhile (a slow liveness answer on a
        # loaded machine), the op attaches the run to it again, as it would for any client.
        assert run.forward(probe, "cross_entropy").result(timeout=300).metrics["loss:sum"] == pytest.approx(before,
                                                                                                          rel=1e-5)
        return pool_runs(api, pool_of(api, run.model_id))

    eventually_sync(served_by_its_pool, lambda runs: runs == [run.model_id], timeout=120, interval=2.0,
                    what="the run listed by the pool its session names")


def test_a_run_over_its_tenant_s_limit_waits_with_paused_capacity_then_starts(
        gateway: GatewayProc, api: Api) -> None:
    twin_sessions = [s for s in api.list(PLURAL, NAMESPACE) if s["spec"]["owner"] == "twin"]
    assert len(twin_sessions) == 2  # the limit (max_runs_per_tenant=2)
    with gateway.http("tml-twin") as http:
        session_id = raw.new_session(http)
        created = http.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 0,
                                                          "base_model": TINY, "lora_config": {"rank": 4}})
        assert created.status_code == 200, created.text
        request_id = created.json()["request_id"]
        paused = eventually_sync(lambda: http.post("/api/v1/retrieve_future", json={"request_id": request_id},
                                                   timeout=45).json(),
                                 lambda a: a.get("queue_state") == "paused_capacity", timeout=60,
                                 what="the create future reports paused_capacity")
        assert paused["type"] == "try_again" and "max_runs_per_tenant" in paused["queue_state_reason"]
        waiting = [s for s in api.list(PLURAL, NAMESPACE) if s["spec"]["owner"] == "twin" and
                   not (s.get("status") or {}).get("pool")]
        assert len(waiting) == 1 and waiting[0]["status"]["phase"] == "Pending"
        assert api.delete(PLURAL, NAMESPACE, twin_sessions[0]["metadata"]["name"]) == 200  # a slot frees up
        model_id = raw.result_json(http, request_id)["model_id"]
    assert pool_of(api, model_id) == twin_sessions[1]["status"]["pool"]
