"""A pool of runs on one base model: co-batched ops give each run exactly its math alone, runs are
isolated from each other's bad input, and concurrent samples decode together with their own results.

Every check compares a run inside a shared pool (co-batched with others) with a twin: the same run,
same spec and same requests, alone in a pool of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.component.trainer.engine_fixtures import (
    ce_datums,
    fb_body,
    rl_datums,
    sample_request,
)
from tinkerkube_contract import custom_loss
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind, RunSpec, SampleOp
from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer import custom_loss_run, train_pass
from tinkerkube_trainer.engine import PoolEngine, build_engine
from tinkerkube_trainer.engine_api import LocalCollective, OpError, OpOutput, PoolConfig, PreparedOp
from tinkerkube_trainer.multilora import peft_state_dict

TOL = {"rtol": 1e-5, "atol": 1e-6}
RUNS = {  # different ranks, targets, seeds and losses: nothing of one run resembles another
    "pool:train:0": (LoraSpec(rank=4, alpha=8.0, seed=1), "cross_entropy"),
    "pool:train:1": (LoraSpec(rank=8, alpha=4.0, seed=2, train_mlp=False), "importance_sampling"),
    "pool:train:2": (LoraSpec(rank=2, alpha=2.0, seed=3, train_attn=False, train_unembed=False), "ppo"),
}


def pool(tmp_path: Path, cache: Path, *model_ids: str) -> PoolEngine:
    engine = build_engine(PoolConfig(base_model=TINY_QWEN3, checkpoint_dir=tmp_path / "ckpt", model_cache_dir=cache,
                                     device="cpu"), LocalCollective())
    for model_id in model_ids:
        outcome = engine.run_pass([engine.prepare_attach(RunSpec(model_id=model_id, base_model=TINY_QWEN3,
                                                                 lora=RUNS[model_id][0]))])[0]
        assert not isinstance(outcome, OpError), outcome
    return engine


def data_for(model_id: str, step: int) -> list[types.Datum]:
    seed = 10 * int(model_id.rsplit(":", 1)[1]) + step
    return ce_datums(3 + step, seed=seed) if RUNS[model_id][1] == "cross_entropy" else rl_datums(4, seed=seed)


def fb(engine: PoolEngine, model_id: str, step: int, **kw: Any) -> PreparedOp:
    body = fb_body(kw.pop("data", None) or data_for(model_id, step), RUNS[model_id][1], **kw)
    return engine.prepare(model_id, OpKind.FORWARD_BACKWARD, body, CONTENT_PROTOBUF)


def step(engine: PoolEngine, model_id: str, lr: float = 0.05) -> PreparedOp:
    return engine.prepare(model_id, OpKind.OPTIM_STEP, json.dumps({"adam_params": {"learning_rate": lr}}).encode(),
                          CONTENT_JSON)


def ok(outcome: OpOutput | OpError) -> OpOutput:
    assert isinstance(outcome, OpOutput), outcome
    return outcome


def assert_same_fb(a: OpOutput, b: OpOutput) -> None:
    x, y = deserialize_forward_backward_output(a.body), deserialize_forward_backward_output(b.body)
    assert x.metrics["loss:sum"] == pytest.approx(y.metrics["loss:sum"], rel=1e-5)
    for u, v in zip(x.loss_fn_outputs, y.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(u["logprobs"].data, v["logprobs"].data, **TOL)
        np.testing.assert_allclose(u["elementwise_loss"].data, v["elementwise_loss"].data, **TOL)


def assert_same_run(a: PoolEngine, b: PoolEngine, model_id: str) -> None:
    ra, rb = a.runs[model_id], b.runs[model_id]
    wa, wb = peft_state_dict(ra.weights), peft_state_dict(rb.weights)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOL)
    assert (ra.acc is None) == (rb.acc is None)
    for x, y in zip(ra.acc or [], rb.acc or [], strict=True):
        torch.testing.assert_close(x, y, **TOL)


def test_co_batched_runs_get_exactly_their_math_alone(tmp_path: Path, model_cache_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, *RUNS)
    alone = {m: pool(tmp_path / m.replace(":", "-"), model_cache_dir, m) for m in RUNS}
    for s in range(2):
        outs = shared.run_pass([fb(shared, m, s) for m in RUNS])  # one forward/backward for all three runs
        for m, out in zip(RUNS, outs, strict=True):
            assert_same_fb(ok(out), ok(alone[m].run_pass([fb(alone[m], m, s)])[0]))
            assert_same_run(shared, alone[m], m)
        for out in shared.run_pass([step(shared, m) for m in RUNS]):
            ok(out)
        for m in RUNS:
            ok(alone[m].run_pass([step(alone[m], m)])[0])
            assert_same_run(shared, alone[m], m)


def test_one_runs_poison_never_touches_another(tmp_path: Path, model_cache_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, "pool:train:0", "pool:train:1")
    twin = pool(tmp_path / "twin", model_cache_dir, "pool:train:0")
    victim, culprit = "pool:train:0", "pool:train:1"
    poison = rl_datums(4, seed=5)
    # finite inputs (NaN is refused when decoded) whose loss overflows float32
    poison[0].loss_fn_inputs["advantages"] = types.TensorData(data=[3e38] * poison[0].model_input.length,
                                                              dtype="float32")
    before = peft_state_dict(shared.runs[culprit].weights)
    outs = shared.run_pass([fb(shared, victim, 0), fb(shared, culprit, 0, data=poison)])
    assert isinstance(outs[1], OpError) and outs[1].code == "non_finite_loss" and outs[1].category == "user"
    assert shared.runs[culprit].acc is None  # nothing of the poisoned batch was accumulated
    assert_same_fb(ok(outs[0]), ok(twin.run_pass([fb(twin, victim, 0)])[0]))
    assert_same_run(shared, twin, victim)
    ok(shared.run_pass([step(shared, victim), step(shared, culprit)])[0])
    ok(twin.run_pass([step(twin, victim)])[0])
    assert_same_run(shared, twin, victim)
    after = peft_state_dict(shared.runs[culprit].weights)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)  # its step had no gradients to apply


def test_a_batch_too_large_for_memory_fails_alone(tmp_path: Path, model_cache_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, "pool:train:0", "pool:train:1")
    twin = pool(tmp_path / "twin", model_cache_dir, "pool:train:0")
    real = train_pass.Model.logits

    def limited(self, chunks, works):  # a device that holds at most 20 rows
        if sum(c.batch.input_ids.shape[0] for c in chunks) > 20:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return real(self, chunks, works)

    monkeypatch.setattr(train_pass.Model, "logits", limited)
    huge = rl_datums(24, seed=9)
    outs = shared.run_pass([fb(shared, "pool:train:0", 0), fb(shared, "pool:train:1", 0, data=huge)])
    assert isinstance(outs[1], OpError) and outs[1].code == "batch_too_large"
    assert_same_fb(ok(outs[0]), ok(twin.run_pass([fb(twin, "pool:train:0", 0)])[0]))
    assert_same_run(shared, twin, "pool:train:0")
    assert shared.runs["pool:train:1"].acc is None


def sample_op(engine: PoolEngine, model_id: str | None, snapshot: str | None = None, **params: Any) -> PreparedOp:
    body = SampleOp(request=sample_request([40, 41, 42, 43, 44][: params.pop("prompt_len", 5)], **params),
                    model_id=model_id, snapshot_id=snapshot).model_dump_json().encode()
    return engine.prepare(None, OpKind.SAMPLE, body, CONTENT_JSON)


def tokens_and_logprobs(out: OpOutput | OpError) -> list[tuple[list[int], list[float]]]:
    resp = deserialize_sample_response(ok(out).body)
    return [(s.tokens, list(s.logprobs or [])) for s in resp.sequences]


def alt_tokens(out: OpOutput | OpError) -> tuple[list[list[int]], list[list[float]]]:
    alt = deserialize_sample_response(ok(out).body).prompt_alt_tokens
    return ([[]], [[]]) if alt is None else (alt.tokens.tolist(), alt.logprobs.tolist())


def test_concurrent_samples_decode_together_with_their_own_results(tmp_path: Path, model_cache_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, *RUNS)
    for m in RUNS:  # trained a little, so every adapter differs from the base model
        ok(shared.run_pass([fb(shared, m, 0)])[0])
        ok(shared.run_pass([step(shared, m, lr=0.5)])[0])
    save = json.dumps({"snapshot_id": "snap"}).encode()
    ok(shared.run_pass([shared.prepare("pool:train:0", OpKind.SAVE_SAMPLER_WEIGHTS, save, CONTENT_JSON)])[0])
    ok(shared.run_pass([fb(shared, "pool:train:0", 1)])[0])
    ok(shared.run_pass([step(shared, "pool:train:0", lr=0.5)])[0])  # the live weights move past the snapshot
    requests = [("pool:train:0", None, dict(num_samples=2, max_tokens=7, temperature=0.0, stop=[])),
                ("pool:train:0", "snap", dict(num_samples=1, max_tokens=5, temperature=0.0, stop=[], prompt_len=3)),
                ("pool:train:1", None, dict(num_samples=3, max_tokens=6, seed=11, stop=[], top_k=20,
                                            prompt_alt_tokens_k=3)),
                ("pool:train:2", None, dict(num_samples=1, max_tokens=4, seed=5, temperature=0.7, stop=[],
                                            prompt_alt_tokens_k=2, prompt_len=4)),
                (None, None, dict(num_samples=2, max_tokens=6, temperature=0.0, stop=[], prompt_len=2))]
    together = shared.run_pass([sample_op(shared, m, snap, **dict(p)) for m, snap, p in requests])
    for (m, snap, p), out in zip(requests, together, strict=True):
        alone = shared.run_pass([sample_op(shared, m, snap, **dict(p))])[0]
        got, want = tokens_and_logprobs(out), tokens_and_logprobs(alone)
        assert [t for t, _ in got] == [t for t, _ in want], (m, snap)
        for (_, a), (_, b) in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert alt_tokens(out)[0] == alt_tokens(alone)[0], (m, snap)  # prompt_alt_tokens_k: the same draws
        np.testing.assert_allclose(alt_tokens(out)[1], alt_tokens(alone)[1], rtol=1e-4, atol=1e-5)
    assert [len(alt_tokens(o)[0][0]) for o in together] == [0, 0, 3, 2, 0]
    greedy = [tokens_and_logprobs(o)[0][0] for o in together]
    assert greedy[0] != greedy[1] or greedy[0] != greedy[4]  # live, snapshot and base weights are different models


def test_a_run_costs_its_adapter_optimizer_and_gradients(tmp_path: Path, model_cache_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, "pool:train:0")
    run = shared.runs["pool:train:0"]
    adapter = run.weights.num_bytes()
    assert run.num_bytes() == adapter  # fresh: the adapter alone
    ok(shared.run_pass([fb(shared, "pool:train:0", 0)])[0])
    ok(shared.run_pass([step(shared, "pool:train:0")])[0])
    # + AdamW's two moments and a step counter per tensor (the accumulator is freed by the step)
    assert 3 * adapter <= run.num_bytes() <= 3 * adapter + 8 * len(run.params())


def test_runs_attach_detach_and_refuse_what_the_pool_cannot_serve(tmp_path: Path, model_cache_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, "pool:train:0")
    with pytest.raises(OpError) as err:
        shared.prepare_attach(RunSpec(model_id="x", base_model="some/other-model"))
    assert err.value.code == "pool_mismatch"
    with pytest.raises(OpError) as err:
        shared.prepare_attach(RunSpec(model_id="x", base_model=TINY_QWEN3, lora=LoraSpec(rank=512)))
    assert err.value.code == "rank_too_large"
    ok(shared.run_pass([shared.prepare_detach("pool:train:0")])[0])
    assert shared.runs == {}
    with pytest.raises(OpError) as err:
        fb(shared, "pool:train:0", 0)
    assert err.value.code == "run_not_found"


def test_requests_joining_a_running_decode_get_their_alone_results(tmp_path: Path, model_cache_dir: Path) -> None:
    from tinkerkube_trainer.sampling import SampleJob, decode_stream

    shared = pool(tmp_path / "shared", model_cache_dir, *RUNS)
    for m in RUNS:
        ok(shared.run_pass([fb(shared, m, 0)])[0])
        ok(shared.run_pass([step(shared, m, lr=0.5)])[0])
    jobs = [sample_op(shared, m, None, **p).payload.params for m, p in [
        ("pool:train:0", dict(num_samples=2, max_tokens=9, temperature=0.0, stop=[])),
        ("pool:train:1", dict(num_samples=3, max_tokens=4, seed=3, stop=[], prompt_len=2)),  # joins at step 2
        (None, dict(num_samples=1, max_tokens=6, temperature=0.0, stop=[], prompt_len=4)),  # joins at step 5
        ("pool:train:2", dict(num_samples=2, max_tokens=0, stop=[]))]]  # nothing to generate
    weights = [shared.runs["pool:train:0"].weights, shared.runs["pool:train:1"].weights, None,
               shared.runs["pool:train:2"].weights]
    arrivals = {0: [0], 2: [1], 5: [2, 3]}
    calls, finished = [0], {}

    def take() -> list[tuple[int, SampleJob]]:
        due = arrivals.pop(calls[0], [])
        calls[0] += 1
        return [(i, SampleJob(jobs[i], weights[i])) for i in due]

    def done(i: int, result: Any) -> None:
        finished[i] = (calls[0], [s.tokens for s in result.sequences], [s.logprobs for s in result.sequences])

    decode_stream(shared.module, take, done, eos_ids=shared.eos_ids, device=shared.device,
                  routing=shared.sites.routing, decode=lambda ids: shared.tokenizer.decode(ids))
    assert sorted(finished) == [0, 1, 2, 3]
    assert finished[3][1] == [[], []] and finished[1][0] < finished[0][0]  # reported as soon as done
    for i in range(4):
        alone = decode_stream_alone(shared, jobs[i], weights[i])
        assert finished[i][1] == [s.tokens for s in alone.sequences], i
        for got, want in zip(finished[i][2], [s.logprobs for s in alone.sequences], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def decode_stream_alone(engine: PoolEngine, params: Any, weights: Any) -> Any:
    from tinkerkube_trainer.sampling import SampleJob, sample_batch

    return sample_batch(engine.module, [SampleJob(params, weights)], eos_ids=engine.eos_ids, device=engine.device,
                        routing=engine.sites.routing, decode=lambda ids: engine.tokenizer.decode(ids))[0]


def custom_fb_body(data: list[types.Datum]) -> bytes:
    """A forward_backward running a custom loss, as the gateway forwards it (the stored graph put in)."""
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    def weighted_nll(logprobs, weights):  # traced by torch.fx
        return -(logprobs * weights).sum(), {"custom/tokens:sum": weights.sum()}

    handle = trace_loss(weighted_nll, {"logprobs": 1, "weights": 1}, "session")
    spec = {"name": handle.name, "inputs": [i.model_dump() for i in handle.inputs],
            "graph": encode_graph(handle).model_dump(mode="json")}
    return fb_body(data, "custom", config={"loss_id": "loss-1", custom_loss.SPEC_CONFIG_KEY: json.dumps(spec)})


def test_a_custom_loss_failing_mid_pass_fails_alone(tmp_path: Path, model_cache_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the meta-tensor check a custom loss should not fail; if it does, only its op fails."""
    shared = pool(tmp_path / "shared", model_cache_dir, "pool:train:0", "pool:train:1")
    twin = pool(tmp_path / "twin", model_cache_dir, "pool:train:0")
    victim, culprit = "pool:train:0", "pool:train:1"
    custom = shared.prepare(culprit, OpKind.FORWARD_BACKWARD, custom_fb_body(ce_datums(3, seed=4)), CONTENT_PROTOBUF)
    before = peft_state_dict(shared.runs[culprit].weights)

    def fails(*_: Any) -> Any:
        raise OpError("loss 'weighted_nll' failed on datum 0: boom", code="invalid_custom_loss")

    monkeypatch.setattr(custom_loss_run, "datum_loss", fails)
    outs = shared.run_pass([fb(shared, victim, 0), custom])
    assert isinstance(outs[1], OpError) and "boom" in outs[1].message and outs[1].category == "user"
    assert shared.runs[culprit].acc is None  # nothing of it was accumulated
    assert_same_fb(ok(outs[0]), ok(twin.run_pass([fb(twin, victim, 0)])[0]))
    monkeypatch.undo()
    out = deserialize_forward_backward_output(ok(shared.run_pass([custom])[0]).body)  # the same op runs now
    tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in ce_datums(3, seed=4))
    assert out.metrics["custom/tokens:sum"] == pytest.approx(tokens, rel=1e-6)
    ok(shared.run_pass([step(shared, culprit)])[0])
    assert any(not torch.equal(before[k], v) for k, v in peft_state_dict(shared.runs[culprit].weights).items())
