"""The trainer image as a pool: it boots with only a base model, and a run attaches over its pod API
(PUT /v1/runs/{model_id}), then trains with the real math (tiny Qwen3 baked into the image, LoRA, AdamW).

The Pod is the operator's own rendering (`manifests.pod`: read-only root, uid 10001, its volumes) with a
pool's environment (`launch.pool_env`) instead of a run's; the test kubelet runs it with podman.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.images.conftest import NAMESPACE, TRAINER_UID, Images, container_of, pod_status, wait_ready
from tests.support.eventually import eventually_sync
from tests.support.fakes import forward_backward_body, json_body
from tests.support.kmock_cluster import Api
from tests.support.kubelet import Kubelet
from tinkerkube_contract import launch
from tinkerkube_contract import pod_api as papi
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import TRAINER_PORT, LoraSpec, TrainingSessionSpec
from tinkerkube_operator import manifests
from tinkerkube_operator.manifests import PodConfig, SessionRef

pytestmark = pytest.mark.slow
MODEL_ID = "pool-run:train:0"
BATCH = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]


@dataclass
class Pool:
    pod_name: str
    http: httpx.Client  # the pod API at the pod's address


@pytest.fixture(scope="module")
def pool(images: Images, api: Api, kubelet: Kubelet, checkpoint_host_dir: Path) -> Iterator[Pool]:
    ref = SessionRef("pool-a", NAMESPACE)
    spec = TrainingSessionSpec(base_model=TINY_QWEN3, model_id="unused", owner="images")
    pod = manifests.pod(ref, spec, PodConfig(image=images.trainer, checkpoint_host_path=str(checkpoint_host_dir)), 0)
    container = pod["spec"]["containers"][0]
    env = launch.pool_env(TINY_QWEN3, checkpoint_dir=spec.checkpoint_store.mount_path, port=TRAINER_PORT)
    container["env"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    name = pod["metadata"]["name"]
    api.create("pods", NAMESPACE, pod)
    status = wait_ready(api, kubelet, name)
    with httpx.Client(base_url=f"http://{status['podIP']}:{TRAINER_PORT}", timeout=60) as client:
        yield Pool(name, client)
    api.delete("pods", NAMESPACE, name)


def _op(client: httpx.Client, seq: int, kind: OpKind, body: bytes) -> httpx.Response:
    content_type = papi.CONTENT_PROTOBUF if kind is OpKind.FORWARD_BACKWARD else papi.CONTENT_JSON
    put = client.put(papi.op_path(MODEL_ID, seq), content=body,
                     headers={papi.HEADER_OP: str(kind), "content-type": content_type})
    assert put.status_code in (200, 202), put.text
    for _ in range(10):
        got = client.get(papi.op_path(MODEL_ID, seq), params={"wait": 30})
        if got.headers.get(papi.HEADER_OP_STATE) != "pending":
            assert got.headers[papi.HEADER_OP_STATE] == "complete", got.text
            return got
    raise AssertionError(f"op {seq} still pending")


def _loss(client: httpx.Client, seq: int, *, forward_only: bool) -> float:
    body = forward_backward_body(BATCH, model_id=MODEL_ID, seq_id=seq, forward_only=forward_only)
    out: Any = deserialize_forward_backward_output(_op(client, seq, OpKind.FORWARD_BACKWARD, body).content)
    return float(out.metrics["loss:sum"])


def test_the_pool_container_runs_read_only_as_the_image_user(pool: Pool, kubelet: Kubelet, images: Images) -> None:
    found = container_of(kubelet, pool.pod_name)
    assert found["ImageName"] == images.trainer
    assert found["HostConfig"]["ReadonlyRootfs"] is True
    assert found["Config"]["User"].split(":")[0] == str(TRAINER_UID)
    info = papi.PoolInfo.model_validate(pool.http.get(papi.INFO_PATH).json())
    assert info.base_model == TINY_QWEN3 and info.ready and info.runs == []


def test_a_run_attaches_over_the_pod_api_and_trains(pool: Pool) -> None:
    spec = papi.RunSpec(model_id=MODEL_ID, base_model=TINY_QWEN3, lora=LoraSpec(rank=8, seed=0))
    put = pool.http.put(papi.run_path(MODEL_ID), content=json_body(spec), headers={"content-type": papi.CONTENT_JSON})
    assert put.status_code in (200, 201, 202), put.text
    info = pool.http.get(papi.run_path(MODEL_ID), params={"wait": 30}).json()
    assert info["state"] == "ready", info
    assert papi.PoolInfo.model_validate(pool.http.get(papi.INFO_PATH).json()).runs == [MODEL_ID]

    before = _loss(pool.http, 1, forward_only=False)
    _op(pool.http, 2, OpKind.OPTIM_STEP, json_body(papi.OptimStepOp(adam_params=papi.AdamParams(learning_rate=5e-2))))
    after = _loss(pool.http, 3, forward_only=True)
    assert 0 < after < before, (before, after)


def test_a_run_saves_its_state_onto_the_checkpoint_volume(pool: Pool, checkpoint_host_dir: Path) -> None:
    _op(pool.http, 4, OpKind.SAVE_STATE, json_body(papi.SaveStateOp(name="pool-step")))
    saved = [p for p in checkpoint_host_dir.rglob("*") if p.is_file() and "pool-step" in str(p)]
    assert saved, sorted(str(p) for p in checkpoint_host_dir.rglob("*"))
    assert {p.stat().st_uid for p in saved} == {TRAINER_UID}


def test_the_caches_libraries_write_to_are_writable_under_the_operators_pod_spec(
        images: Images, api: Api, kubelet: Kubelet, checkpoint_host_dir: Path) -> None:
    # A base model that is not built in is downloaded into HF_HOME at attach; torch writes its caches
    # under XDG_CACHE_HOME and the temp dir. Under the read-only root each must be on a writable volume.
    script = ("import os, tempfile, huggingface_hub.constants as hf\n"
              "torch_cache = os.path.join(os.environ['XDG_CACHE_HOME'], 'torch')\n"
              "for d in (hf.HF_HUB_CACHE, torch_cache, tempfile.gettempdir()):\n"
              "    os.makedirs(d, exist_ok=True); tempfile.mkstemp(dir=d); print('writable', d)\n")
    ref = SessionRef("caches", NAMESPACE)
    spec = TrainingSessionSpec(base_model=TINY_QWEN3, model_id="caches", owner="images")
    pod = manifests.pod(ref, spec, PodConfig(image=images.trainer, checkpoint_host_path=str(checkpoint_host_dir)), 0)
    pod["spec"]["containers"][0].update(command=["python", "-c", script], readinessProbe=None)
    name = pod["metadata"]["name"]
    api.create("pods", NAMESPACE, pod)
    status = eventually_sync(lambda: pod_status(api, name), lambda s: s.get("phase") in ("Succeeded", "Failed"),
                             timeout=120, what=f"pod {name} finished")
    log = kubelet.logs(NAMESPACE, name)
    assert status["phase"] == "Succeeded", log
    assert log.count("writable /tmp") == 3, log
    api.delete("pods", NAMESPACE, name)
