"""`sampler: vllm` end to end: real trainer processes (real HTTP pod API, real training), a real vLLM
OpenAI server (the CPU build, `make vllm-venv`) started by the trainer, against the HF decode path.

Two pools of the same local tiny Qwen3 (head_dim 32: vLLM needs >= 32) get the same ops: one samples
with our own decode loop (`hf`), the other through vLLM with the run's sampler weights loaded as a LoRA
adapter. Float32 on both sides, so vLLM's logprobs must equal the learner's teacher-forced recompute
(and the HF path's) to TOL, greedy samples must be token for token the same, and after more training and
a new save vLLM must serve the NEW weights (a reused adapter name would silently serve the old ones).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.support.fakes import forward_backward_body, json_body
from tests.support.trainer_proc import REPO, PodClient, start_trainer
from tinkerkube_contract import env
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL_ID = "sess-vllm:train:0"
TOL = 1e-4  # float32 vLLM vs float32 transformers: observed <= ~1e-5 per token
PROMPT = [40, 41, 42, 43, 44, 45]
DATA = [[1, 5, 9, 13, 17, 21, 25, 29], [40, 41, 42, 43, 44, 45, 46, 47, 48], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
VLLM_PYTHON = Path(os.environ.get("TINKERKUBE_TEST_VLLM_PYTHON", REPO / ".cache" / "vllm-venv" / "bin" / "python"))


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinkerkube_trainer.model_store import build_tiny_qwen3

    out = tmp_path_factory.mktemp("tiny-qwen3-hd32")
    build_tiny_qwen3(out, head_dim=32)
    return out


def _vllm_env() -> dict[str, str]:
    if not VLLM_PYTHON.exists():  # CI builds it (`make test` depends on `make vllm-venv`): never skip
        pytest.fail(f"no vLLM venv at {VLLM_PYTHON}: run `make vllm-venv` (or set TINKERKUBE_TEST_VLLM_PYTHON)")
    return {
        env.SAMPLER: "vllm",
        env.PREFIX + "VLLM_PYTHON": str(VLLM_PYTHON),
        env.PREFIX + "VLLM_DTYPE": "float32",
        env.PREFIX + "VLLM_ARGS": json.dumps(["--max-model-len", "256", "--distributed-executor-backend", "uni",
                                              "--max-num-seqs", "16", "--seed", "0"]),
        env.PREFIX + "VLLM_ENV": json.dumps({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                             "OMP_NUM_THREADS": "1"}),
        env.PREFIX + "VLLM_MAX_ADAPTERS": "1",  # w1 is unloaded for w2, then loaded again (same content name)
    }


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path,
          vllm_model_dir: Path) -> Iterator[dict[str, PodClient]]:
    """{"hf": ..., "vllm": ...}: the same run, trained one step, its sampler weights saved as `w1`."""
    spec = TrainingSessionSpec(base_model=str(vllm_model_dir), model_id=MODEL_ID, owner="tests",
                               lora=LoraSpec(rank=8, alpha=16, seed=3))
    tmp = tmp_path_factory.mktemp("vllm-pools")
    with contextlib.ExitStack() as stack:
        groups = {}
        for name, extra in (("hf", {}), ("vllm", _vllm_env())):
            group = start_trainer(spec, checkpoint_dir=tmp / name / "ckpt", model_cache_dir=model_cache_dir,
                                  log_dir=tmp / name / "logs", extra_env=extra)
            stack.callback(group.stop)
            groups[name] = group
        clients = {}
        for name, group in groups.items():
            group.wait_ready(600)
            clients[name] = group.client(timeout=300)
            stack.callback(clients[name].close)
        for client in clients.values():
            train_and_save(client, "w1")
        yield clients
        for name, group in groups.items():  # for a failing test's report
            print(f"--- {name} logs ---\n{group.logs()[-3000:]}")


_seqs: dict[int, int] = {}


def run_op(client: PodClient, kind: OpKind, body: bytes) -> Any:
    """The run's next op (seq ids are consecutive per run)."""
    _seqs[id(client)] = seq = _seqs.get(id(client), 0) + 1
    return client.run(seq, kind, body, timeout=300)


def train_and_save(client: PodClient, name: str) -> None:
    """Two forward_backward + optim_step rounds, then save_weights_for_sampler `name`."""
    for _ in range(2):
        run_op(client, OpKind.FORWARD_BACKWARD, forward_backward_body(DATA))
        run_op(client, OpKind.OPTIM_STEP, json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=0.05))))
    run_op(client, OpKind.SAVE_SAMPLER_WEIGHTS, json_body(api.SaveSamplerWeightsOp(name=name)))


def sampler_path(name: str) -> str:
    return f"tinker://{MODEL_ID}/sampler_weights/{name}"


_count = 0


def sample(client: PodClient, snapshot: str | None, *, prompt: list[int] = PROMPT, base: bool = False,
           **params: Any) -> Any:
    """One sample request through the pod API; the SDK's own decoded response."""
    global _count
    _count += 1
    flags = {k: params.pop(k) for k in ("prompt_logprobs", "topk_prompt_logprobs", "prompt_alt_tokens_k")
             if k in params}
    request = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
               "num_samples": params.pop("num_samples", 1), "sampling_params": params, **flags}
    op = api.SampleOp(request=request, model_id=None if base else MODEL_ID,
                      snapshot_id=None if snapshot is None else sampler_path(snapshot))
    rid = f"s{_count}"
    client.put_sample(rid, op.model_dump_json().encode())
    return deserialize_sample_response(client.sample_result(rid, timeout=300).content)


def teacher_forced(client: PodClient, tokens: list[int]) -> np.ndarray:
    """The learner's logprobs of tokens[1:] (forward only, the run's weights now)."""
    body = run_op(client, OpKind.FORWARD_BACKWARD, forward_backward_body([tokens], forward_only=True)).content
    return np.asarray(deserialize_forward_backward_output(body).loss_fn_outputs[0]["logprobs"].data, np.float64)


def test_sampled_and_prompt_logprobs_match_the_learner_and_the_hf_path(pools: dict[str, PodClient]) -> None:
    out = sample(pools["vllm"], "w1", num_samples=3, max_tokens=10, temperature=1.0, seed=11, stop=[],
                 prompt_logprobs=True, topk_prompt_logprobs=4)
    assert len(out.sequences) == 3 and len({tuple(s.tokens) for s in out.sequences}) > 1
    for seq in out.sequences:
        assert len(seq.tokens) == len(seq.logprobs) == 10 and seq.stop_reason == "length"
        full = teacher_forced(pools["vllm"], PROMPT + seq.tokens)  # weights now == w1
        np.testing.assert_allclose(seq.logprobs, full[len(PROMPT) - 1:], atol=TOL, rtol=0)
        print(f"vLLM vs learner, max |logprob diff| of sampled tokens: "
              f"{np.max(np.abs(np.subtract(seq.logprobs, full[len(PROMPT) - 1:]))):.2e}")
        np.testing.assert_allclose(out.prompt_logprobs[1:], full[: len(PROMPT) - 1], atol=TOL, rtol=0)
    hf = sample(pools["hf"], "w1", max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=4)
    assert out.prompt_logprobs[0] is None and hf.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], hf.prompt_logprobs[1:], atol=TOL, rtol=0)
    assert len(out.topk_prompt_logprobs) == len(hf.topk_prompt_logprobs) == len(PROMPT)
    for mine, theirs in zip(out.topk_prompt_logprobs[1:], hf.topk_prompt_logprobs[1:], strict=True):
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        np.testing.assert_allclose([v for _, v in mine], [v for _, v in theirs], atol=TOL, rtol=0)


def test_prompt_alt_tokens_are_the_hf_paths_draws(pools: dict[str, PodClient]) -> None:
    kw = dict(num_samples=2, max_tokens=6, temperature=0.8, seed=9, stop=[], prompt_alt_tokens_k=3)
    got = {name: sample(c, "w1", **dict(kw)) for name, c in pools.items()}
    alts = {name: r.prompt_alt_tokens for name, r in got.items()}
    assert alts["vllm"] is not None and alts["vllm"].tokens.shape == [len(PROMPT) - 1, 3]
    assert alts["vllm"].tokens.tolist() == alts["hf"].tokens.tolist()  # same model, same seeded draws
    np.testing.assert_allclose(alts["vllm"].logprobs.to_numpy(), alts["hf"].logprobs.to_numpy(), atol=TOL, rtol=0)
    plain = sample(pools["vllm"], "w1", **{**kw, "prompt_alt_tokens_k": 0})
    assert plain.prompt_alt_tokens is None
    assert [s.tokens for s in plain.sequences] == [s.tokens for s in got["vllm"].sequences]  # vLLM's, unchanged


def test_greedy_samples_are_the_hf_paths_tokens(pools: dict[str, PodClient]) -> None:
    for snapshot, base in (("w1", False), (None, True)):
        got = {name: sample(c, snapshot, base=base, max_tokens=16, temperature=0.0, stop=[], num_samples=2)
               for name, c in pools.items()}
        assert [s.tokens for s in got["vllm"].sequences] == [s.tokens for s in got["hf"].sequences]
        for mine, theirs in zip(got["vllm"].sequences, got["hf"].sequences, strict=True):
            np.testing.assert_allclose(mine.logprobs, theirs.logprobs, atol=TOL, rtol=0)


def test_seeds_reproduce_and_stops_are_honoured(pools: dict[str, PodClient]) -> None:
    vllm = pools["vllm"]
    kwargs: dict[str, Any] = {"num_samples": 2, "max_tokens": 12, "temperature": 1.0, "stop": []}
    first, again = (sample(vllm, "w1", seed=123, **kwargs) for _ in range(2))
    other = sample(vllm, "w1", seed=124, **kwargs)
    tokens = [s.tokens for s in first.sequences]
    assert tokens == [s.tokens for s in again.sequences] and tokens != [s.tokens for s in other.sequences]

    # A stop token: the same seeded draws, cut at its first occurrence (included).
    stop = tokens[0][4]
    cut = sample(vllm, "w1", seed=123, **{**kwargs, "stop": [stop]}).sequences[0]
    first_at = tokens[0].index(stop)
    assert cut.tokens == tokens[0][: first_at + 1] and cut.stop_reason == "stop"
    np.testing.assert_allclose(cut.logprobs, first.sequences[0].logprobs[: first_at + 1], atol=1e-6, rtol=0)

    # A stop string: the tokenizer's text of what was drawn; generation ends at the token completing it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_model_dir(vllm))
    text = [tok.decode(tokens[0][: i + 1]) for i in range(len(tokens[0]))]
    needle = next((text[i][-2:] for i in range(3, len(text)) if len(text[i]) >= 2 and text[i][-2:] not in text[i - 1]),
                  None)
    assert needle, f"no usable stop string in {text[-1]!r}"
    done = sample(vllm, "w1", seed=123, **{**kwargs, "stop": [needle]}).sequences[0]
    end = next(i for i in range(len(text)) if needle in text[i])
    assert done.tokens == tokens[0][: end + 1] and done.stop_reason == "stop"

    # stop=None: EOS ends a sample (forcing EOS is not possible; only that max_tokens still caps it).
    capped = sample(vllm, "w1", seed=123, num_samples=1, max_tokens=3, temperature=1.0)
    assert len(capped.sequences[0].tokens) <= 3


def _model_dir(client: PodClient) -> str:
    return str(client.http.get(api.INFO_PATH).json()["tokenizer_dir"])


def test_new_weights_are_served_after_more_training(pools: dict[str, PodClient]) -> None:
    """The stale-id trap: after more training and a new save, vLLM must serve the new weights."""
    before = {n: sample(c, "w1", max_tokens=12, temperature=0.0, stop=[]) for n, c in pools.items()}
    for client in pools.values():
        train_and_save(client, "w2")
    after = {n: sample(c, "w2", max_tokens=12, temperature=0.0, stop=[]) for n, c in pools.items()}
    live = {n: sample(c, None, max_tokens=12, temperature=0.0, stop=[]) for n, c in pools.items()}
    old = sample(pools["vllm"], "w1", max_tokens=12, temperature=0.0, stop=[])
    for result in (after, live):
        assert result["vllm"].sequences[0].tokens == result["hf"].sequences[0].tokens
        np.testing.assert_allclose(result["vllm"].sequences[0].logprobs, result["hf"].sequences[0].logprobs,
                                   atol=TOL, rtol=0)
    # the training moved the weights: w1's greedy logprobs differ, and w1 itself is still served as it was
    assert not np.allclose(after["vllm"].sequences[0].logprobs, before["vllm"].sequences[0].logprobs, atol=1e-3)
    assert old.sequences[0].tokens == before["vllm"].sequences[0].tokens
    np.testing.assert_allclose(old.sequences[0].logprobs, before["vllm"].sequences[0].logprobs, atol=1e-6, rtol=0)
