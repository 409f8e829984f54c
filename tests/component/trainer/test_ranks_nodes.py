"""Two "pods": two torchrun processes on 127.0.0.1 (`--nnodes=2`, node ranks 0 and 1), real engine.

The group they form trains exactly like one in-process engine on one rank fed the same ops, and when
the second pod's rank is killed, both pods exit non-zero (rank 0's idle heartbeat notices).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.support.fakes import forward_backward_body, json_body
from tests.support.trainer_proc import trainer_group
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.env import PREFIX
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SPEC = TrainingSessionSpec(base_model=TINY_QWEN3, model_id="sess-nodes:train:0", owner="tests",
                           lora=LoraSpec(rank=4, alpha=8, seed=11), replicas=2)
DATA = [[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10], [3, 1, 4, 1, 5], [11, 12, 13]]
OPS = [
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA)),
    (OpKind.OPTIM_STEP, json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=2e-2)))),
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA[::-1])),
    (OpKind.OPTIM_STEP, json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=2e-2)))),
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA, forward_only=True)),
]


def reference(model_cache_dir: Path, checkpoint_dir: Path) -> list[bytes]:
    from tests.component.trainer.engine_fixtures import engine_config, new_engine

    engine = new_engine(engine_config(checkpoint_dir, model_cache_dir, model_id=SPEC.model_id,
                                      base_model=SPEC.base_model, mode=SPEC.mode, lora=SPEC.lora))
    out = []
    for kind, body in OPS:
        ctype = CONTENT_PROTOBUF if kind is OpKind.FORWARD_BACKWARD else CONTENT_JSON
        out.append(engine.execute(engine.prepare(kind, body, ctype)).body)
    return out


def test_two_torchrun_pods_train_like_one_rank_and_fail_together(
        tmp_path: Path, model_cache_dir: Path, tiny_model_dir: Path) -> None:
    with trainer_group(SPEC, checkpoint_dir=tmp_path / "ckpt", model_cache_dir=model_cache_dir, nnodes=2,
                       nproc_per_node=1, log_dir=tmp_path / "logs", ready_timeout=150,
                       extra_env={PREFIX + "HEARTBEAT_SECONDS": "0.5"}) as group:
        client = group.client()
        info = client.http.get(api.INFO_PATH).json()
        assert info["world_size"] == 2 and info["ready"]
        for seq, (kind, body) in enumerate(OPS, start=1):
            client.put_op(seq, kind, body)
        got = [client.result(seq).content for seq in range(1, len(OPS) + 1)]
        nodes = {e["node_rank"] for e in group.events("rank started")}
        client.close()
        assert nodes == {0, 1}

        os.kill(group.worker_pids()[1], signal.SIGKILL)
        codes = group.wait_exit(30)
        assert all(c is not None and c != 0 for c in codes), f"{codes}\n{group.logs()[-3000:]}"

    want = reference(model_cache_dir, tmp_path / "ref")
    for i, (kind, _) in enumerate(OPS):
        if kind is OpKind.OPTIM_STEP:
            assert json.loads(got[i])["metrics"]["grad_norm"] == pytest.approx(
                json.loads(want[i])["metrics"]["grad_norm"], rel=1e-4)
            continue
        a, b = deserialize_forward_backward_output(want[i]), deserialize_forward_backward_output(got[i])
        assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(y["logprobs"].data, x["logprobs"].data, rtol=1e-5, atol=1e-5)
