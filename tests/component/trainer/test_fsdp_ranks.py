"""`sharding: fsdp`: real torchrun groups whose ranks shard the frozen base (FSDP2 over gloo) train,
checkpoint and sample like one replicated rank.

Two layouts: two ranks in one torchrun (`--nproc_per_node=2`) and two "pods" (`--nnodes=2`, one rank
each, on 127.0.0.1). Each gets the same ops as a one-rank in-process reference engine (replicate):
two forward_backward + optim_step rounds, a forward-only pass, a round of one datum (the second
rank has no rows but must join every collective of the first), a checkpoint (its adapter tensors are
the weights after the steps), a greedy sample and a seeded temperature-1 sample (every rank decodes
in lockstep with rank 0's seeds). Each rank's log says how many base parameter bytes it holds: half
of the whole base, give or take one row of padding per tensor.

Tolerances (rel/abs 1e-5 on losses, logprobs and weights; 1e-4 on grad norms) are those of
replicated ranks (test_ranks.py), for the same reason: each rank computes its own shard of the rows,
so the matmuls and the gradient sum see another reduction order than one rank's single batch. The
all-gathered base weights themselves are exact copies. Sampled tokens must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.support.fakes import forward_backward_body, json_body
from tests.support.trainer_proc import TrainerGroup, trainer_group
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.env import PREFIX, SHARDING
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL_ID = "sess-fsdp:train:0"
SPEC = TrainingSessionSpec(base_model=TINY_QWEN3, model_id=MODEL_ID, owner="tests",
                           lora=LoraSpec(rank=4, alpha=8, seed=11, train_unembed=True))
DATA = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8], [3, 1, 4, 1, 5, 9, 2, 6], [10, 20, 30], [7, 7, 7, 7, 7, 7]]
STEP = json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=2e-2)))
SAVE = json_body(api.SaveStateOp(name="after-steps"))
OPS = [
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA)),
    (OpKind.OPTIM_STEP, STEP),
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA[::-1])),
    (OpKind.OPTIM_STEP, STEP),
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA, forward_only=True)),
    # one datum: rank 1 has no rows, yet must join every all-gather of rank 0's forward and backward
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA[2:3])),
    (OpKind.OPTIM_STEP, STEP),
    (OpKind.FORWARD_BACKWARD, forward_backward_body(DATA[3:4], forward_only=True)),
    (OpKind.SAVE_STATE, SAVE),
]


def _sample(request_id: str, **params: Any) -> api.SampleOp:
    return api.SampleOp(request={"prompt": {"chunks": [{"type": "encoded_text", "tokens": DATA[0]}]},
                                 "num_samples": 3, "sampling_params": {"max_tokens": 8, "stop": [], **params}},
                        model_id=MODEL_ID)


SAMPLES = {"greedy": _sample("greedy", temperature=0.0), "seeded": _sample("seeded", temperature=1.0, seed=1234)}


def reference(model_cache_dir: Path, checkpoint_dir: Path) -> tuple[list[bytes], dict[str, bytes], Any]:
    from tests.component.trainer.engine_fixtures import engine_config, new_engine

    engine = new_engine(engine_config(checkpoint_dir, model_cache_dir, model_id=MODEL_ID, base_model=TINY_QWEN3,
                                      mode=SPEC.mode, lora=SPEC.lora))
    out = []
    for seq, (kind, body) in enumerate(OPS, start=1):
        ctype = CONTENT_PROTOBUF if kind is OpKind.FORWARD_BACKWARD else CONTENT_JSON
        out.append(engine.execute(engine.prepare(kind, body, ctype, seq_id=seq)).body)
    samples = {name: engine.pool.run_pass([engine.pool.prepare(None, OpKind.SAMPLE, json_body(op), CONTENT_JSON)])[0]
               for name, op in SAMPLES.items()}
    whole_base = sum(p.numel() * p.element_size() for p in engine.pool.module.parameters())
    return out, {k: v.body for k, v in samples.items()}, whole_base  # type: ignore[union-attr]


def drive(group: TrainerGroup) -> tuple[list[bytes], dict[str, bytes]]:
    client = group.client()
    try:
        assert client.http.get(api.INFO_PATH).json()["world_size"] == 2
        for seq, (kind, body) in enumerate(OPS, start=1):
            client.put_op(seq, kind, body)
        got = [client.result(seq).content for seq in range(1, len(OPS) + 1)]
        for name, op in SAMPLES.items():  # both at once: one sampling pass, decoded together on every rank
            client.put_sample(name, json_body(op))
        return got, {name: client.sample_result(name).content for name in SAMPLES}
    finally:
        client.close()


def adapter(checkpoint_root: Path) -> dict[str, torch.Tensor]:
    files = [p for p in checkpoint_root.rglob("adapter_model.safetensors") if "after-steps" in str(p)]
    assert len(files) == 1, files
    return load_file(str(files[0]))


def check_like_one_rank(tmp_path: Path, model_cache_dir: Path, group: TrainerGroup) -> None:
    got, sampled = drive(group)
    held = {e["rank"]: e["base_param_bytes"] for e in group.events("base model loaded")}
    sharding = {e["sharding"] for e in group.events("base model loaded")}
    want, want_samples, whole_base = reference(model_cache_dir, tmp_path / "ref")

    assert sharding == {"fsdp"} and sorted(held) == [0, 1]
    for rank_bytes in held.values():  # ~half each (ceil rows), together the whole base
        assert 0.45 * whole_base <= rank_bytes <= 0.55 * whole_base, (held, whole_base)
    assert whole_base <= sum(held.values()) <= 1.01 * whole_base
    for i, (kind, _) in enumerate(OPS):
        if kind is OpKind.OPTIM_STEP:
            assert json.loads(got[i])["metrics"]["grad_norm"] == pytest.approx(
                json.loads(want[i])["metrics"]["grad_norm"], rel=1e-4)
        elif kind is OpKind.FORWARD_BACKWARD:
            a, b = deserialize_forward_backward_output(want[i]), deserialize_forward_backward_output(got[i])
            assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
            for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
                np.testing.assert_allclose(y["logprobs"].data, x["logprobs"].data, rtol=1e-5, atol=1e-5)
    # the steps moved the weights (the forward-only pass after them differs from the first pass)
    first, last = (deserialize_forward_backward_output(want[i]).metrics["loss:sum"] for i in (0, 4))
    assert abs(first - last) > 1e-3
    mine, theirs = adapter(tmp_path / "ckpt"), adapter(tmp_path / "ref")
    assert mine.keys() == theirs.keys() and any("lm_head" in k for k in mine)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-5)
    for name in SAMPLES:
        a, b = (deserialize_sample_response(x) for x in (want_samples[name], sampled[name]))
        assert [s.tokens for s in b.sequences] == [s.tokens for s in a.sequences]
        assert all(len(s.tokens) == 8 for s in b.sequences)
        for x, y in zip(a.sequences, b.sequences, strict=True):
            np.testing.assert_allclose(y.logprobs, x.logprobs, rtol=1e-5, atol=1e-5)
    seeded = [s.tokens for s in deserialize_sample_response(sampled["seeded"]).sequences]
    assert len({tuple(t) for t in seeded}) > 1  # temperature 1 really sampled (three different draws)


# A rank left out of a collective fails the group within a minute rather than the default ten.
FSDP_ENV = {SHARDING: "fsdp", PREFIX + "HEARTBEAT_SECONDS": "0.5", PREFIX + "COLLECTIVE_TIMEOUT_SECONDS": "60"}


def test_two_fsdp_ranks_train_checkpoint_and_sample_like_one_rank(
        tmp_path: Path, model_cache_dir: Path, tiny_model_dir: Path) -> None:
    with trainer_group(SPEC, checkpoint_dir=tmp_path / "ckpt", model_cache_dir=model_cache_dir, nproc_per_node=2,
                       log_dir=tmp_path / "logs", ready_timeout=150, extra_env=FSDP_ENV) as group:
        check_like_one_rank(tmp_path, model_cache_dir, group)


def test_two_fsdp_pods_train_checkpoint_and_sample_like_one_rank(
        tmp_path: Path, model_cache_dir: Path, tiny_model_dir: Path) -> None:
    with trainer_group(SPEC, checkpoint_dir=tmp_path / "ckpt", model_cache_dir=model_cache_dir, nnodes=2,
                       nproc_per_node=1, log_dir=tmp_path / "logs", ready_timeout=150, extra_env=FSDP_ENV) as group:
        assert {e["node_rank"] for e in group.events("rank started")} == {0, 1}
        check_like_one_rank(tmp_path, model_cache_dir, group)
