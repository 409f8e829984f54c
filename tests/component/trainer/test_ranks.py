"""Real torchrun, real engine (tiny Qwen3), real HTTP: data parallelism changes nothing but speed.

One rank and two ranks (`--nproc_per_node=2`, gloo) get the same forward_backward + optim_step, and
must give the same loss, the same logprobs, and the same weights afterwards (seen through a forward
pass after the step). The two-rank run receives its ops out of order, and must still run them in
seq order: had the forward run before the optim_step, its logprobs would be the base model's. A greedy
sample afterwards (rank 0 alone, the other rank idle) gives the same tokens from both groups.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.support.fakes import forward_backward_body, json_body
from tests.support.trainer_proc import TrainerGroup, start_trainer
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL_ID = "sess-ranks:train:0"
# Five datums of uneven lengths: two ranks split them 3 + 2, and padding differs from one rank's.
DATA = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8], [3, 1, 4, 1, 5, 9, 2, 6], [10, 20, 30], [7, 7, 7, 7, 7, 7]]
STEP = json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=1e-2)))


def spec() -> TrainingSessionSpec:
    return TrainingSessionSpec(base_model=TINY_QWEN3, model_id=MODEL_ID, owner="tests",
                               lora=LoraSpec(rank=4, alpha=8, seed=7))


def logprobs(body: bytes) -> list[np.ndarray]:
    out = deserialize_forward_backward_output(body)
    return [np.asarray(o["logprobs"].data, dtype=np.float64) for o in out.loss_fn_outputs]


def loss_sum(body: bytes) -> float:
    return float(deserialize_forward_backward_output(body).metrics["loss:sum"])


SAMPLE = api.SampleOp(request={"prompt": {"chunks": [{"type": "encoded_text", "tokens": DATA[0]}]},
                                "num_samples": 2, "sampling_params": {"max_tokens": 6, "temperature": 0.0, "stop": []}},
                      model_id=MODEL_ID)


def greedy_tokens(group: TrainerGroup) -> list[list[int]]:
    """A sample after training: rank 0 alone runs it while the other rank waits, and it sees the trained weights."""
    client = group.client()
    try:
        client.put_sample("after-step", SAMPLE.model_dump_json().encode())
        return [s.tokens for s in deserialize_sample_response(client.sample_result("after-step").content).sequences]
    finally:
        client.close()


def run_in_order(group: TrainerGroup) -> dict[int, bytes]:
    client = group.client()
    try:
        return {
            1: client.run(1, OpKind.FORWARD_BACKWARD, forward_backward_body(DATA)).content,
            2: client.run(2, OpKind.OPTIM_STEP, STEP).content,
            3: client.run(3, OpKind.FORWARD_BACKWARD, forward_backward_body(DATA, forward_only=True)).content,
        }
    finally:
        client.close()


def run_out_of_order(group: TrainerGroup) -> dict[int, bytes]:
    client = group.client()
    try:
        client.put_op(3, OpKind.FORWARD_BACKWARD, forward_backward_body(DATA, forward_only=True))
        client.put_op(2, OpKind.OPTIM_STEP, STEP)
        waiting = client.get_op(3, wait=0.5)
        assert waiting.status_code == 202 and waiting.json()["queue_position"] == 2, waiting.text
        client.put_op(1, OpKind.FORWARD_BACKWARD, forward_backward_body(DATA))
        return {seq: client.result(seq).content for seq in (3, 2, 1)}
    finally:
        client.close()


def test_two_ranks_give_the_one_rank_result_and_run_out_of_order_ops_in_order(
        tmp_path: Path, model_cache_dir: Path, tiny_model_dir: Path) -> None:
    with contextlib.ExitStack() as stack:
        groups = []
        for procs in (1, 2):  # started together: they load side by side
            group = start_trainer(spec(), checkpoint_dir=tmp_path / f"ckpt{procs}", model_cache_dir=model_cache_dir,
                                  nproc_per_node=procs, token="t0k3n", log_dir=tmp_path / f"logs{procs}")
            stack.callback(group.stop)
            groups.append(group)
        for group in groups:
            group.wait_ready(150)
        one, two = groups
        for group, world in ((one, 1), (two, 2)):
            client = group.client()
            assert client.http.get(api.INFO_PATH).json()["world_size"] == world
            client.close()

        ref, dp = run_in_order(one), run_out_of_order(two)
        sampled = [greedy_tokens(one), greedy_tokens(two)]

    assert loss_sum(dp[1]) == pytest.approx(loss_sum(ref[1]), rel=1e-5)
    grad_norm = [json.loads(r[2])["metrics"]["grad_norm"] for r in (ref, dp)]
    assert grad_norm[1] == pytest.approx(grad_norm[0], rel=1e-4)
    for seq in (1, 3):
        for a, b in zip(logprobs(ref[seq]), logprobs(dp[seq]), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # the step changed the weights (so seq 3 really ran after seq 2 on both)
    assert not np.allclose(np.concatenate(logprobs(ref[1])), np.concatenate(logprobs(ref[3])), atol=1e-4)
    assert sampled[0] == sampled[1] and len(sampled[0]) == 2 and all(len(t) == 6 for t in sampled[0])
    assert two.returncodes() != [None]  # torn down
