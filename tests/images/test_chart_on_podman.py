"""The chart's gateway and operator Deployments, from their images, on the emulated cluster; the real tinker
SDK trains through them on a TrainerPool the operator makes (pool binding, the chart's default), its pod run
from the trainer image: two runs of one tenant bound to one pool, both training, the pool counting them, a
deleted TrainingSession detached from it.

SDK → gateway container (backend=kubernetes) → TrainingSession → operator container (kopf) → TrainerPool →
Pod → podman kubelet → trainer container (torchrun, tiny Qwen3 baked into the image) — every hop a real image started
with its pod spec: `helm template` with the kind e2e's values (charts/tinkerkube/ci/kind-values.yaml), the
Secrets applied, each Deployment's pod template created as a Pod. Only what cannot exist here is replaced:
the images are the locally built ones, ports are free ones (host networking), the API server is reached by
URL (kmock has no in-cluster service account), and the checkpoint hostPath is a temp folder.
"""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import yaml
from tinker import types

from tests.chart.helm_tool import ensure_helm
from tests.images.conftest import NAMESPACE, TRAINER_UID, Images, container_of, wait_ready
from tests.support.eventually import eventually_sync
from tests.support.kmock_cluster import Api, EmulatedCluster
from tests.support.kubelet import Kubelet
from tinkerkube_contract import pod_api
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.resource import ANNOTATION_MODEL_ID, LABEL_POOL, LABEL_SESSION, PLURAL, POOL_PLURAL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tinkerkube"
RELEASE = "tk"
API_KEY = "tml-kind-e2e"  # ci/kind-values.yaml: gateway.apiKeys.keys


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _image(ref: str) -> dict[str, str]:
    repository, _, tag = ref.rpartition(":")
    return {"registry": "", "repository": repository, "tag": tag, "pullPolicy": "Never"}


@dataclass
class Release:
    gateway_pod: str
    operator_pod: str
    gateway_url: str
    metrics_url: str
    trainer_token: str  # the chart's generated Secret: the pod API of pools asks for it


def render(images: Images, cluster: EmulatedCluster, checkpoint_host_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    gateway_port, metrics_port = _free_port(), _free_port()
    overrides = {
        "gateway": {"image": _image(images.gateway), "port": gateway_port,
                    "extraEnv": [{"name": "TINKERKUBE_GATEWAY_KUBE_API_URL", "value": cluster.url}]},
        "operator": {"image": _image(images.operator), "metricsPort": metrics_port,
                     "extraEnv": [{"name": "TINKERKUBE_OPERATOR_API_URL", "value": cluster.url}]},
        "trainer": {"image": _image(images.trainer), "checkpoints": {"hostPath": str(checkpoint_host_dir)}},
        "ingress": {"enabled": False},
    }
    values = tmp / "images-values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    proc = subprocess.run([str(ensure_helm()), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "-f", str(CHART / "ci" / "kind-values.yaml"), "-f", str(values)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _deployment_pod(deployment: dict[str, Any]) -> dict[str, Any]:
    """What a ReplicaSet would create (there are no controllers in the emulator)."""
    template = deployment["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{deployment['metadata']['name']}-0", "namespace": NAMESPACE,
                         "labels": template["metadata"].get("labels", {})},
            "spec": template["spec"]}


@pytest.fixture(scope="module")
def release(images: Images, cluster: EmulatedCluster, api: Api, kubelet: Kubelet, checkpoint_host_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    docs = render(images, cluster, checkpoint_host_dir, tmp_path_factory.mktemp("chart"))
    for secret in (d for d in docs if d["kind"] == "Secret"):
        api.create("secrets", NAMESPACE, secret)
    pods = {}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = _deployment_pod(deployment)
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        pods[component] = pod["metadata"]["name"]
        api.create("pods", NAMESPACE, pod)
    assert set(pods) == {"gateway", "operator"}, pods
    operator = wait_ready(api, kubelet, pods["operator"])
    gateway = wait_ready(api, kubelet, pods["gateway"])
    env = {e["name"]: e.get("value") for d in docs if d["kind"] == "Deployment"
           for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    (token,) = [base64.b64decode(d["data"]["token"]).decode() for d in docs
                if d["kind"] == "Secret" and d["metadata"]["name"].endswith("trainer-token")]
    yield Release(pods["gateway"], pods["operator"],
                  f"http://{gateway['podIP']}:{env['TINKERKUBE_GATEWAY_PORT']}",
                  f"http://{operator['podIP']}:{env['TINKERKUBE_OPERATOR_METRICS_PORT']}", token)
    for name in pods.values():
        api.delete("pods", NAMESPACE, name)


@pytest.fixture(scope="module")
def service(release: Release) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=release.gateway_url, api_key=API_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def training(service: tinker.ServiceClient) -> tinker.TrainingClient:
    return service.create_lora_training_client(base_model=TINY_QWEN3, rank=8).result(timeout=300)


def _session_of(api: Api, model_id: str) -> dict[str, Any]:
    (session,) = [s for s in api.list(PLURAL, NAMESPACE)
                  if (s["metadata"].get("annotations") or {}).get(ANNOTATION_MODEL_ID) == model_id]
    return session


def _pool_status(api: Api, pool: str) -> dict[str, Any]:
    return (api.get(POOL_PLURAL, NAMESPACE, pool) or {}).get("status") or {}


def _pool_runs(api: Api, pool: str, token: str) -> list[str]:
    """What the pool's trainer container itself says it holds (its pod API, with the chart's token)."""
    url = _pool_status(api, pool)["endpoint"]["url"]
    got = httpx.get(url + pod_api.INFO_PATH, headers={pod_api.HEADER_TOKEN: token}, timeout=10)
    assert got.status_code == 200, got.text
    return sorted(got.json()["runs"])


def _datum(n: int) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def _read_only_as_the_image_user(found: dict[str, Any], image: str) -> None:
    assert found["ImageName"] == image
    assert found["HostConfig"]["ReadonlyRootfs"] is True
    assert found["Config"]["User"].split(":")[0] == str(TRAINER_UID)


def test_the_gateway_image_answers_healthz_under_the_charts_pod_spec(
        release: Release, kubelet: Kubelet, images: Images) -> None:
    assert httpx.get(release.gateway_url + "/api/v1/healthz", timeout=10).status_code == 200
    _read_only_as_the_image_user(container_of(kubelet, release.gateway_pod), images.gateway)


def test_the_operator_image_runs_and_serves_its_liveness_endpoint(
        release: Release, kubelet: Kubelet, images: Images) -> None:
    metrics = httpx.get(release.metrics_url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "tinkerkube_operator" in metrics.text
    _read_only_as_the_image_user(container_of(kubelet, release.operator_pod), images.operator)


def test_an_sdk_training_step_runs_on_a_trainer_pod_from_the_trainer_image(
        training: tinker.TrainingClient, api: Api, kubelet: Kubelet, images: Images) -> None:
    batch = [_datum(6), _datum(4), _datum(5)]
    first = training.forward_backward(batch, "cross_entropy").result(timeout=180)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=180)
    after = training.forward(batch, "cross_entropy").result(timeout=180)
    assert after.metrics["loss:sum"] < first.metrics["loss:sum"]

    # The operator bound the gateway's TrainingSession to a TrainerPool (it owns no pods itself) and
    # reconciled the pool into one Pod of the trainer image ...
    session = _session_of(api, training.model_id)
    assert session["status"]["phase"] == "Ready" and session["status"]["pool"]
    assert api.list("pods", NAMESPACE, **{LABEL_SESSION: session["metadata"]["name"]}) == []
    (pod,) = api.list("pods", NAMESPACE, **{LABEL_POOL: session["status"]["pool"]})
    assert pod["spec"]["containers"][0]["image"] == images.trainer
    # ... which the kubelet ran as that image's container, read-only, as uid 10001.
    _read_only_as_the_image_user(container_of(kubelet, pod["metadata"]["name"]), images.trainer)


def test_sampling_and_a_checkpoint_on_the_shared_volume(
        training: tinker.TrainingClient, checkpoint_host_dir: Path) -> None:
    sampler = training.save_weights_and_get_sampling_client().result(timeout=180)
    result = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=4))
    assert len(result.result(timeout=180).sequences) == 2
    path = training.save_state("images-step").result(timeout=180).path
    assert path.startswith("tinker://")
    saved = eventually_sync(
        lambda: [p for p in checkpoint_host_dir.rglob("*") if p.is_file() and "images-step" in str(p)],
        bool, timeout=30, what="checkpoint files on the hostPath")
    assert {p.stat().st_uid for p in saved} == {TRAINER_UID}


def test_two_runs_of_a_tenant_share_one_trainer_pool_and_a_deleted_session_detaches(
        service: tinker.ServiceClient, training: tinker.TrainingClient, api: Api, release: Release) -> None:
    second = service.create_lora_training_client(base_model=TINY_QWEN3, rank=8, seed=7).result(timeout=300)
    pool = _session_of(api, training.model_id)["status"]["pool"]
    assert _session_of(api, second.model_id)["status"]["pool"] == pool  # one tenant, one pool with room
    assert len(api.list(POOL_PLURAL, NAMESPACE)) == 1
    # Both runs train on the one resident base, each through its own adapter.
    batch = [_datum(7), _datum(5)]
    for run in (training, second):
        first = run.forward_backward(batch, "cross_entropy").result(timeout=180)
        run.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=180)
        after = run.forward(batch, "cross_entropy").result(timeout=180)
        assert after.metrics["loss:sum"] < first.metrics["loss:sum"], run.model_id
    status = eventually_sync(lambda: _pool_status(api, pool), lambda s: s.get("runsUsed") == 2, timeout=30,
                             what="both runs counted on the pool")
    max_runs = (api.get(POOL_PLURAL, NAMESPACE, pool) or {})["spec"]["maxRuns"]
    assert status["phase"] == "Ready" and status["runsFree"] == max_runs - 2
    assert _pool_runs(api, pool, release.trainer_token) == sorted([training.model_id, second.model_id])
    # Deleting the second run's TrainingSession detaches it from the pool; the first keeps training there.
    assert api.delete(PLURAL, NAMESPACE, _session_of(api, second.model_id)["metadata"]["name"]) == 200
    eventually_sync(lambda: _pool_runs(api, pool, release.trainer_token), lambda runs: runs == [training.model_id],
                    timeout=60, what="the deleted session's run detached from the pool")
    eventually_sync(lambda: _pool_status(api, pool), lambda s: s.get("runsUsed") == 1, timeout=30,
                    what="the freed slot counted")
    assert training.forward(batch, "cross_entropy").result(timeout=180).metrics["loss:sum"] > 0
