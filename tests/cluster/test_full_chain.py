"""The whole chain on an emulated cluster, driven by the real tinker SDK; the tests run in file order
on one training run: supervised steps, sampling, save and resume, a trainer killed mid-session and
recreated by the operator (the gateway replays), and deletion ending the processes."""

from __future__ import annotations

import time
from typing import Any

import pytest
import tinker
from tinker import types

from tests.cluster.conftest import NAMESPACE, TINY
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster
from tests.support.kubelet import Kubelet
from tests.support.sdk import GatewayProc
from tinkerkube_contract.resource import ANNOTATION_MODEL_ID, LABEL_SESSION, LABEL_TENANT, PLURAL

pytestmark = pytest.mark.slow


def datum(n: int = 6) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def _session_of(api: Api, model_id: str) -> dict[str, Any]:
    (obj,) = [s for s in api.list(PLURAL, NAMESPACE)
              if s["metadata"].get("annotations", {}).get(ANNOTATION_MODEL_ID) == model_id]
    return obj


def _pods(api: Api, name: str) -> list[dict[str, Any]]:
    return api.list("pods", NAMESPACE, **{LABEL_SESSION: name})


@pytest.fixture(scope="module")
def training(client: tinker.ServiceClient) -> tinker.TrainingClient:
    return client.create_lora_training_client(base_model=TINY, rank=8).result(timeout=300)


def test_a_training_run_is_a_training_session_served_by_a_local_pod(
        training: tinker.TrainingClient, api: Api, kubelet: Kubelet) -> None:
    ts = _session_of(api, training.model_id)
    assert ts["status"]["phase"] == "Ready" and ts["metadata"]["labels"][LABEL_TENANT] == "local"
    (pod,) = _pods(api, ts["metadata"]["name"])
    assert ts["status"]["endpoint"]["url"] == f"http://{pod['status']['podIP']}:8080"
    assert kubelet.live_processes()


def test_supervised_steps_reduce_the_loss(training: tinker.TrainingClient) -> None:
    batch = [datum(6), datum(4), datum(5)]
    first = training.forward_backward(batch, "cross_entropy").result(timeout=120)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    after = training.forward(batch, "cross_entropy").result(timeout=120)
    assert after.metrics["loss:sum"] < first.metrics["loss:sum"]


def test_sampling_from_the_live_run_uses_its_own_pod(training: tinker.TrainingClient, api: Api) -> None:
    before = len(api.list("pods", NAMESPACE))
    sampler = training.save_weights_and_get_sampling_client().result(timeout=120)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    result = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result(timeout=120)
    assert len(result.sequences) == 2
    assert len(api.list("pods", NAMESPACE)) == before


def test_futures_are_mirrored_into_the_session_status(training: tinker.TrainingClient, api: Api) -> None:
    futures = eventually_sync(lambda: _session_of(api, training.model_id)["status"].get("futures") or {},
                              lambda f: f.get("completed", 0) >= 3 and f.get("pending") == 0, timeout=20,
                              what="futures mirrored (coalesced: the last write may trail the results)")
    assert futures["failed"] == 0


def test_save_state_and_resume_start_a_second_session(
        training: tinker.TrainingClient, client: tinker.ServiceClient, api: Api) -> None:
    path = training.save_state("step1").result(timeout=120).path
    before = training.forward([datum()], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    resumed = client.create_training_client_from_state_with_optimizer(path).result(timeout=300)
    again = resumed.forward([datum()], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert again == pytest.approx(before, rel=1e-4)
    assert _session_of(api, resumed.model_id)["spec"]["restoreFrom"] == path


def test_killed_trainer_is_recreated_and_training_continues(
        training: tinker.TrainingClient, api: Api, kubelet: Kubelet, gateway: GatewayProc) -> None:
    ts = _session_of(api, training.model_id)
    name = ts["metadata"]["name"]
    (pod,) = _pods(api, name)
    kubelet.kill_worker(NAMESPACE, pod["metadata"]["name"])
    eventually_sync(lambda: _session_of(api, training.model_id)["status"], lambda s: s.get("restarts") == 1,
                    timeout=30, what="operator noticed the failure")
    batch = [datum(5), datum(4)]
    try:
        out = training.forward_backward(batch, "cross_entropy").result(timeout=240)
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    except Exception as exc:  # keep the evidence: which side lost the thread
        status = _session_of(api, training.model_id).get("status")
        raise AssertionError(f"{exc!r}\nstatus: {status}\ngateway log:\n{gateway.log()[-3000:]}\n"
                             f"new pod log:\n{kubelet.logs(NAMESPACE, f'{name}-g1-0')[-3000:]}") from exc
    assert out.metrics["loss:sum"] > 0
    status = _session_of(api, training.model_id)["status"]
    assert status["phase"] == "Ready" and status["restarts"] == 1
    assert [p["metadata"]["name"] for p in _pods(api, name)] == [f"{name}-g1-0"]


def test_deleting_the_session_ends_its_processes(
        training: tinker.TrainingClient, api: Api, kubelet: Kubelet, gateway: GatewayProc) -> None:
    name = _session_of(api, training.model_id)["metadata"]["name"]
    pids = {k: rp.proc.pid for k, rp in kubelet.pods.items() if k[1].startswith(name) and rp.proc}
    assert pids
    assert api.delete(PLURAL, NAMESPACE, name) == 200
    eventually_sync(lambda: _pods(api, name), lambda p: p == [], timeout=30, what="pods deleted")
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids.values())


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_ = EmulatedCluster  # fixtures are typed by the conftest
