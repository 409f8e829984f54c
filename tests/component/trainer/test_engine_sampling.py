"""Sampling through the engine: reproducible, exact logprobs, stops, prompt scores, snapshots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.component.trainer.engine_fixtures import (
    ce_datums,
    engine_config,
    new_engine,
    optim_step,
    run_fb,
    run_json,
    run_sample,
    sequence_logprobs,
)
from tinkerkube_contract.pod_api import OpKind

PROMPT = [40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path, tiny_model_dir: Path):
    """Trained one step so the adapter is not the identity; tests here never train it further."""
    eng = new_engine(engine_config(tmp_path_factory.mktemp("sampling"), model_cache_dir))
    run_fb(eng, ce_datums(4, seed=1))
    optim_step(eng, lr=0.05)
    return eng


def test_seeded_sampling_is_reproducible(engine) -> None:
    first = run_sample(engine, PROMPT, num_samples=3, max_tokens=12, seed=123, stop=[])
    again = run_sample(engine, PROMPT, num_samples=3, max_tokens=12, seed=123, stop=[])
    other = run_sample(engine, PROMPT, num_samples=3, max_tokens=12, seed=124, stop=[])
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1, "the samples of one call must differ"


def test_sampled_logprobs_are_the_models_own_logprobs(engine) -> None:
    result = run_sample(engine, PROMPT, num_samples=2, max_tokens=10, seed=5, stop=[])
    for seq in result.sequences:
        assert seq.stop_reason == "length" and len(seq.tokens) == len(seq.logprobs) == 10
        full = sequence_logprobs(engine, PROMPT + seq.tokens)
        np.testing.assert_allclose(seq.logprobs, full[len(PROMPT) - 1 :], rtol=1e-4, atol=1e-5)


def test_sampling_leaves_training_state_and_rng_alone(engine) -> None:
    weights, rng = engine.adapter_weights(), torch.get_rng_state()
    run_sample(engine, PROMPT, num_samples=2, max_tokens=4, seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    for name, tensor in engine.adapter_weights().items():
        assert torch.equal(tensor, weights[name])


def _free_run(engine, seed: int) -> list[int]:
    return run_sample(engine, PROMPT, max_tokens=16, seed=seed, stop=[]).sequences[0].tokens


def test_stop_token_ends_at_first_occurrence_and_is_included_once(engine) -> None:
    tokens = _free_run(engine, seed=9)
    stop_token = tokens[3]
    first = tokens.index(stop_token)
    expected = tokens[: first + 1]
    eos = set(engine.eos_ids)
    if eos & set(expected[:-1]):
        pytest.skip("EOS came first in this draw")
    seq = run_sample(engine, PROMPT, max_tokens=16, seed=9, stop=[stop_token]).sequences[0]
    assert seq.tokens == expected and seq.stop_reason == "stop"
    assert seq.tokens.count(stop_token) == 1


def test_stop_string_ends_at_first_occurrence(engine) -> None:
    tokens = _free_run(engine, seed=21)
    decode = engine.tokenizer.decode
    text = decode(tokens[2:4])
    assert text, "need a non-empty stop string"
    cut = next(n for n in range(1, len(tokens) + 1) if text in decode(tokens[:n]))
    seq = run_sample(engine, PROMPT, max_tokens=16, seed=21, stop=[text]).sequences[0]
    if set(engine.eos_ids) & set(tokens[: cut - 1]):
        pytest.skip("EOS came first in this draw")
    assert seq.tokens == tokens[:cut] and seq.stop_reason == "stop"
    assert decode(seq.tokens).count(text) == 1


def test_empty_stop_list_runs_to_max_tokens(engine) -> None:
    result = run_sample(engine, PROMPT, num_samples=4, max_tokens=20, seed=3, stop=[], temperature=1.5)
    assert all(len(s.tokens) == 20 and s.stop_reason == "length" for s in result.sequences)


def test_prompt_logprobs_match_a_forward_pass(engine) -> None:
    result = run_sample(engine, PROMPT, max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=3)
    assert result.prompt_logprobs[0] is None
    np.testing.assert_allclose(result.prompt_logprobs[1:], sequence_logprobs(engine, PROMPT), rtol=1e-4, atol=1e-5)
    top = result.topk_prompt_logprobs
    assert top[0] is None and all(len(row) == 3 for row in top[1:])
    assert all(row[0][1] >= row[1][1] >= row[2][1] for row in top[1:])
    assert all(row[0][1] >= lp - 1e-5 for row, lp in zip(top[1:], result.prompt_logprobs[1:], strict=True))


def test_target_prompt_and_sampled_topk_logprobs(engine) -> None:
    wanted = [41, -1, 42, 7, -1, -1, 44, 44]  # [len(PROMPT) - 1, 2], row-major
    result = run_sample(engine, PROMPT, max_tokens=3, stop=[], topk_sample_logprobs=4, target_prompt_logprobs=
                        {"data": wanted, "dtype": "int64", "shape": [4, 2]})
    forward = sequence_logprobs(engine, PROMPT)  # logprob of PROMPT[i + 1] at position i
    got = np.asarray(result.target_prompt_logprobs.data).reshape(4, 2)
    np.testing.assert_allclose(got[[0, 1, 3], 0], forward[[0, 1, 3]], rtol=1e-4, atol=1e-5)
    assert got[0, 1] == got[2, 0] == got[2, 1] == 0.0 and got[3, 0] == got[3, 1]
    seq = result.sequences[0]
    assert len(seq.topk_logprobs) == 3 and all(len(row) == 4 for row in seq.topk_logprobs)
    assert all(row[0][1] >= lp - 1e-5 for row, lp in zip(seq.topk_logprobs, seq.logprobs, strict=True))


def test_prompt_logprobs_last_n_scores_only_the_tail(engine) -> None:
    result = run_sample(engine, PROMPT, max_tokens=1, prompt_logprobs=True, prompt_logprobs_last_n=2)
    assert result.prompt_logprobs[:3] == [None, None, None]
    assert all(isinstance(x, float) and not math.isnan(x) for x in result.prompt_logprobs[3:])


def test_prompt_alt_tokens_leave_the_continuation_alone_and_score_like_a_forward(engine) -> None:
    kw = dict(num_samples=2, max_tokens=6, seed=8, stop=[], temperature=0.9)
    plain = run_sample(engine, PROMPT, **kw)
    result = run_sample(engine, PROMPT, prompt_alt_tokens_k=3, **kw)
    assert plain.prompt_alt_tokens is None
    assert [s.tokens for s in result.sequences] == [s.tokens for s in plain.sequences]
    tokens, logprobs = result.prompt_alt_tokens.tokens.to_numpy(), result.prompt_alt_tokens.logprobs.to_numpy()
    assert tokens.shape == logprobs.shape == (len(PROMPT) - 1, 3)
    for i, row in enumerate(tokens.tolist()):  # row i: alternatives to PROMPT[i + 1], after PROMPT[: i + 1]
        forward = [sequence_logprobs(engine, [*PROMPT[: i + 1], t])[-1] for t in row]
        np.testing.assert_allclose(logprobs[i], forward, rtol=1e-4, atol=1e-5)
    again = run_sample(engine, PROMPT, prompt_alt_tokens_k=3, **kw).prompt_alt_tokens
    assert again.tokens.tolist() == tokens.tolist()


def test_snapshot_sampling_is_unaffected_by_later_training(tmp_path: Path, model_cache_dir: Path) -> None:
    engine = new_engine(engine_config(tmp_path, model_cache_dir))
    run_fb(engine, ce_datums(4, seed=1))
    optim_step(engine, lr=0.05)
    run_json(engine, OpKind.SAVE_SAMPLER_WEIGHTS, {"snapshot_id": "sess:sample:0"})
    before = run_sample(engine, PROMPT, "sess:sample:0", num_samples=2, max_tokens=8, seed=4, stop=[])
    for seed in (2, 3):
        run_fb(engine, ce_datums(4, seed=seed))
        optim_step(engine, lr=0.5)
    after = run_sample(engine, PROMPT, "sess:sample:0", num_samples=2, max_tokens=8, seed=4, stop=[])
    current = run_sample(engine, PROMPT, None, num_samples=2, max_tokens=8, seed=4, stop=[])
    assert [s.tokens for s in after.sequences] == [s.tokens for s in before.sequences]
    assert [s.logprobs for s in after.sequences] == [s.logprobs for s in before.sequences]
    assert [s.logprobs for s in current.sequences] != [s.logprobs for s in before.sequences]
    named = run_json(engine, OpKind.SAVE_SAMPLER_WEIGHTS, {"name": "late"})["checkpoint"]["tinker_path"]
    by_path = run_sample(engine, PROMPT, named, num_samples=2, max_tokens=8, seed=4, stop=[])
    assert [s.logprobs for s in by_path.sequences] == [s.logprobs for s in current.sequences]


def test_sample_mode_serves_the_base_model(tmp_path: Path, model_cache_dir: Path) -> None:
    sampler = new_engine(engine_config(tmp_path, model_cache_dir, mode="sample"))
    result = run_sample(sampler, PROMPT, num_samples=2, max_tokens=5, seed=1, stop=[])
    assert all(len(s.tokens) == 5 for s in result.sequences)
    trainer = new_engine(engine_config(tmp_path, model_cache_dir))  # fresh LoRA: B = 0, same function
    np.testing.assert_allclose(sequence_logprobs(trainer, PROMPT + result.sequences[0].tokens)[len(PROMPT) - 1 :],
                               result.sequences[0].logprobs, rtol=1e-4, atol=1e-5)
