"""Server-side custom losses through the real SDK, a real gateway and real trainer processes (tiny model).

`ServiceClient.create_custom_loss` uploads the traced loss (the gateway turns `custom_loss_server_side` on)
and `forward_backward_custom` runs it on the trainer in one forward_backward. The same handle with its
loss_id dropped runs the SDK's client-side path (a forward, the loss on the client, a surrogate backward):
both twins end with the same metrics and the same adapter weights, while a third run co-batched with them
in the same pool trains exactly like its own twin trained alone. Every refused graph or request is a
clear user error on its future or a 4xx, and the session keeps working after all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types
from tinker.lib.public_interfaces.custom_loss import LossHandle, encode_graph

from tests.component.gateway.conftest import TINY, sft_batch
from tests.support.sdk import GatewayProc, start_gateway

pytestmark = pytest.mark.slow
KEYS = '{"tml-alice": "alice", "tml-bob": "bob"}'
RANKS: dict[str, Any] = {"logprobs": 1, "advantages": 1, "scale": 0}


def clipped(logprobs, advantages, scale):
    ratio = torch.exp(logprobs - logprobs.detach())
    position = torch.arange(logprobs.shape[0], dtype=torch.float32, device=logprobs.device)
    loss = -(torch.clamp(ratio, 0.8, 1.2) * advantages).sum() * scale + 0.01 * (logprobs**2 * position).mean()
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/adv:sum": advantages.sum()}


def rl_batch(seed: int) -> list[types.Datum]:
    out = []
    for i in range(3):
        tokens = [(seed * 29 + i * 13 + j * 7) % 300 + 5 for j in range(7 + 2 * i)]
        n = len(tokens) - 1
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": tokens[1:], "advantages": [((seed + i + j) % 5 - 2) / 2 for j in range(n)],
            "scale": types.TensorData(data=[1.0 + i / 4], dtype="float32", shape=[])}))
    return out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
            model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path_factory.mktemp("gw-custom") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True, extra_env={"TINKERKUBE_GATEWAY_API_KEYS": KEYS})
    yield gw
    gw.stop()


@pytest.fixture
def alice(gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=gateway.url, api_key="tml-alice") as client:
        yield client


def weights(gw: GatewayProc, run: tinker.TrainingClient, name: str) -> dict[str, torch.Tensor]:
    run.save_state(name).result()
    (path,) = Path(gw.state_dir, "checkpoints", run.model_id, "weights", name).rglob("adapter_model.safetensors")
    return load_file(path)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        scale = max(float(b[key].abs().max()), 1e-12)
        assert float((a[key] - b[key]).abs().max()) / scale <= 1e-5, key


def steps(run: tinker.TrainingClient, loss: LossHandle | str, seeds: list[int]) -> list[dict[str, float]]:
    out = []
    for seed in seeds:
        if isinstance(loss, str):
            fb = run.forward_backward(sft_batch(seed), loss)
        else:
            fb = run.forward_backward_custom(rl_batch(seed), loss)
        out.append(fb.result().metrics)
        # eps=1: the update follows the gradient's size too, not only its sign (as with a tiny eps)
        run.optim_step(types.AdamParams(learning_rate=0.05, eps=1.0)).result()
    return out


def test_the_server_side_loss_trains_like_the_client_side_one_and_leaves_a_cobatched_run_alone(
        gateway: GatewayProc, alice: tinker.ServiceClient) -> None:
    handle = alice.create_custom_loss(clipped, RANKS).result()
    assert handle.loss_id is not None  # uploaded: the gateway asked for server-side custom losses
    local = dataclasses.replace(handle, loss_id=None)  # the SDK's client-side path, same traced graph
    server_run, client_run, other, other_twin = (
        alice.create_lora_training_client(base_model=TINY, rank=4, seed=s).result() for s in (3, 3, 9, 9))
    assert len(gateway.pools()) == 1  # all four share one pool: their ops are co-batched
    with ThreadPoolExecutor(3) as pool:
        server, client, cobatched = pool.map(lambda args: steps(*args, [1, 2]),
                                             [(server_run, handle), (client_run, local), (other, "cross_entropy")])
    alone = steps(other_twin, "cross_entropy", [1, 2])
    for got, want in zip(server, client, strict=True):
        assert {k for k in got if k.startswith("custom/")} == {"custom/ratio:mean", "custom/adv:sum"}
        for key in ("loss:sum", "custom/ratio:mean", "custom/adv:sum"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert_same_weights(weights(gateway, server_run, "s"), weights(gateway, client_run, "s"))
    assert [m["loss:sum"] for m in cobatched] == pytest.approx([m["loss:sum"] for m in alone], rel=1e-5)
    assert_same_weights(weights(gateway, other, "s"), weights(gateway, other_twin, "s"))
    assert 'tinkerkube_gateway_custom_losses_total{outcome="created"}' in httpx.get(gateway.url + "/metrics").text


def _create_raw(gw: GatewayProc, key: str, session_id: str, seq: int, request: dict[str, Any]) -> dict[str, Any]:
    """create_custom_loss over plain HTTP (for graphs the SDK would never trace), then its future."""
    with gw.http(key) as http:
        sent = http.post("/api/v1/create_custom_loss", json={"session_id": session_id, "custom_loss_seq_id": seq,
                                                             **request})
        assert sent.status_code == 200, sent.text
        answer = http.post("/api/v1/retrieve_future", json={"request_id": sent.json()["request_id"]})
        assert answer.status_code == 200
        return answer.json()


def _graph_request(handle: LossHandle) -> dict[str, Any]:
    return {"name": handle.name, "inputs": [i.model_dump() for i in handle.inputs],
            "graph": encode_graph(handle).model_dump(mode="json")}


def _with_target(request: dict[str, Any], name: str, target: str) -> dict[str, Any]:
    nodes = [dict(n, target=target) if n["name"] == name else n for n in request["graph"]["nodes"]]
    return {**request, "graph": {**request["graph"], "nodes": nodes}}


def test_bad_graphs_and_requests_are_the_users_error_and_the_session_keeps_working(
        gateway: GatewayProc, alice: tinker.ServiceClient) -> None:
    handle = alice.create_custom_loss(clipped, RANKS).result()
    session = alice.holder.get_session_id()
    good = _graph_request(handle)
    deep: Any = 1.0
    for _ in range(12):
        deep = {"tuple": [deep]}
    bad_graphs = {
        "calls 'torch.load'": _with_target(good, "exp", "torch.load"),
        "calls 'torch.rand_like'": _with_target(good, "exp", "torch.rand_like"),
        "calls method 'add_'": _with_target(good, "detach", "add_"),
        "at most 1024 are allowed": {**good, "graph": {"nodes": good["graph"]["nodes"][:3] + [
            {"op": "call_function", "name": f"n{i}", "target": "operator.add", "args": [1, 2]} for i in range(1100)
        ] + good["graph"]["nodes"][3:]}},
        "nested deeper than 8": {**good, "graph": {"nodes": [
            dict(n, args=[*n["args"], deep]) if n["name"] == "exp" else n for n in good["graph"]["nodes"]]}},
    }
    for seq, (message, request) in enumerate(bad_graphs.items(), start=100):
        answer = _create_raw(gateway, "tml-alice", session, seq, request)
        assert answer["category"] == "user" and message in answer["error"], answer
    with gateway.http("tml-alice") as http:  # a refused create consumed its seq_id: a good graph there is a 400
        again = http.post("/api/v1/create_custom_loss", json={"session_id": session, "custom_loss_seq_id": 100,
                                                              **good})
    assert again.status_code == 400 and "already used" in again.json()["detail"], again.text
    first, retried = (_create_raw(gateway, "tml-alice", session, 200, good) for _ in range(2))
    assert first == retried and first["loss_id"].startswith("loss-")  # a retried create: its first answer

    def bad_metric(logprobs):
        return logprobs.sum(), {"Loss": logprobs.sum()}

    with pytest.raises(ValueError, match="custom/<name>:sum"):  # the SDK itself refuses this one
        alice.create_custom_loss(bad_metric, {"logprobs": 1}).result()

    def blowup(logprobs):
        return logprobs.repeat(100_000).sum(), {}

    def nan(logprobs):
        return logprobs.sum() * math.nan, {}

    run = alice.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    with pytest.raises(tinker.RequestFailedError, match="at most 65536") as err:
        big = alice.create_custom_loss(blowup, {"logprobs": 1}).result()
        run.forward_backward_custom(rl_batch(1)[:1], big).result()
    assert err.value.category == "user"
    with pytest.raises(tinker.RequestFailedError, match="not finite") as err:
        run.forward_backward_custom(rl_batch(1), alice.create_custom_loss(nan, {"logprobs": 1}).result()).result()
    assert err.value.category == "user"
    wrong_rank = rl_batch(1)
    wrong_rank[0].loss_fn_inputs["scale"] = types.TensorData(data=[1.0, 2.0], dtype="float32", shape=[2])
    with pytest.raises(tinker.RequestFailedError, match="declared scale with rank 0"):
        run.forward_backward(wrong_rank, "custom", {"loss_id": handle.loss_id}).result()  # past the SDK's check
    with pytest.raises(tinker.BadRequestError, match="unknown custom loss_id"):
        run.forward_backward(rl_batch(1), "custom", {"loss_id": "loss-nope"}).result()
    with tinker.ServiceClient(base_url=gateway.url, api_key="tml-alice") as other_session:
        theirs = other_session.create_custom_loss(clipped, RANKS).result()
    with pytest.raises(tinker.BadRequestError, match="belongs to session"):
        run.forward_backward(rl_batch(1), "custom", {"loss_id": theirs.loss_id}).result()
    with tinker.ServiceClient(base_url=gateway.url, api_key="tml-bob") as bob:
        bobs = bob.create_custom_loss(clipped, RANKS).result()
    with pytest.raises(tinker.BadRequestError, match="unknown custom loss_id"):
        run.forward_backward(rl_batch(1), "custom", {"loss_id": bobs.loss_id}).result()
    with gateway.http("tml-bob") as http:  # another tenant cannot create in alice's session
        assert http.post("/api/v1/create_custom_loss", json={"session_id": session, "custom_loss_seq_id": 500,
                                                             **good}).status_code == 404
    # after all of it: the session and the run still train with their custom loss
    metrics = run.forward_backward_custom(rl_batch(2), handle).result().metrics
    assert math.isfinite(metrics["loss:sum"]) and "custom/ratio:mean" in metrics
    assert run.optim_step(types.AdamParams(learning_rate=0.05)).result() is not None
    assert 'tinkerkube_gateway_custom_losses_total{outcome="refused"} 5.0' in httpx.get(gateway.url + "/metrics").text
