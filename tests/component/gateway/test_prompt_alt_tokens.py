"""`prompt_alt_tokens_k` end to end: the real `tinker` SDK, a real gateway and a real trainer on the tiny model.

Every draw is checked against something computed apart from it: its logprob against the same model's
`target_prompt_logprobs` of those very tokens (another request), greedy and top-k=1 draws against the
request's own `topk_prompt_logprobs`, a seed against itself, co-batched requests against each alone.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import sft_batch
from tinkerkube_contract.pod_api import MAX_PROMPT_ALT_TOKEN_CELLS, MAX_PROMPT_ALT_TOKENS_K
from tinkerkube_trainer.sample_checks import prompt_alt_tokens_problem

pytestmark = pytest.mark.slow

PROMPT = [40, 41, 42, 43, 44, 45, 46]


@pytest.fixture(scope="module")
def sampler(training: tinker.TrainingClient) -> tinker.SamplingClient:
    """The run trained one step (its adapter is not the identity), served by its own trainer."""
    training.forward_backward(sft_batch(3), "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return training.save_weights_and_get_sampling_client().result()


@pytest.fixture(scope="module")
def vocab(tiny_model_dir: Path) -> int:
    return int(json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"])


def _ask(sampler: tinker.SamplingClient, prompt: list[int] = PROMPT, k: int = 4, *, num_samples: int = 1,
         **params: object) -> Future[types.SampleResponse]:
    topk = int(params.pop("topk", 0) or 0)  # type: ignore[call-overload]
    return sampler.sample(types.ModelInput.from_ints(prompt), num_samples,
                          types.SamplingParams(max_tokens=params.pop("max_tokens", 1), stop=[], **params),
                          prompt_alt_tokens_k=k, topk_prompt_logprobs=topk)


def _alts(response: types.SampleResponse) -> tuple[np.ndarray, np.ndarray]:
    alt = response.prompt_alt_tokens
    assert alt is not None, "prompt_alt_tokens missing from the answer"
    return alt.tokens.to_numpy(), alt.logprobs.to_numpy()


def test_shapes_ids_and_logprobs_match_the_models_own_scores(sampler: tinker.SamplingClient, vocab: int) -> None:
    tokens, logprobs = _alts(_ask(sampler, k=5, seed=7, temperature=0.8).result())
    assert tokens.shape == logprobs.shape == (len(PROMPT) - 1, 5)
    assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
    assert tokens.min() >= 0 and tokens.max() < vocab
    assert np.all(logprobs <= 0) and np.all(np.isfinite(logprobs))
    scored = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1),
                            target_prompt_logprobs=types.TensorData.from_numpy(tokens)).result()
    assert scored.target_prompt_logprobs is not None
    np.testing.assert_allclose(logprobs, scored.target_prompt_logprobs.to_numpy(), rtol=1e-4, atol=1e-5)


def test_greedy_and_top_k_one_draws_are_the_argmax(sampler: tinker.SamplingClient) -> None:
    for params in ({"temperature": 0.0}, {"top_k": 1, "seed": 3}, {"top_p": 1e-6, "seed": 3}):
        response = _ask(sampler, k=3, topk=1, **params).result()
        tokens, logprobs = _alts(response)
        best = response.topk_prompt_logprobs[1:]  # row i of the draws is prompt position i + 1
        assert tokens.tolist() == [[row[0][0]] * 3 for row in best], params
        np.testing.assert_allclose(logprobs, [[row[0][1]] * 3 for row in best], rtol=1e-4, atol=1e-5)


def test_draws_spread_over_the_distribution_at_temperature_one(sampler: tinker.SamplingClient) -> None:
    tokens, logprobs = _alts(_ask(sampler, k=MAX_PROMPT_ALT_TOKENS_K, seed=5).result())
    greedy, _ = _alts(_ask(sampler, k=1, temperature=0.0).result())
    assert all(len(set(row)) > 1 for row in tokens.tolist())  # with replacement, not k copies of one token
    assert np.mean(tokens == greedy) < 0.9 and np.mean(logprobs) < np.max(logprobs)


def test_a_seed_repeats_its_draws_and_leaves_the_continuation_alone(sampler: tinker.SamplingClient) -> None:
    kw = {"num_samples": 2, "max_tokens": 8, "seed": 21, "temperature": 1.2}
    plain = _ask(sampler, k=0, **kw).result()
    first, again = _ask(sampler, k=6, **kw).result(), _ask(sampler, k=6, **kw).result()
    other = _ask(sampler, k=6, **{**kw, "seed": 22}).result()
    assert plain.prompt_alt_tokens is None
    assert [s.tokens for s in first.sequences] == [s.tokens for s in plain.sequences]
    assert [s.tokens for s in again.sequences] == [s.tokens for s in plain.sequences]
    assert _alts(first)[0].tolist() == _alts(again)[0].tolist()
    assert _alts(first)[0].tolist() != _alts(other)[0].tolist()


def test_co_batched_requests_get_what_they_get_alone(sampler: tinker.SamplingClient) -> None:
    asks = [dict(k=4, seed=1, max_tokens=6), dict(prompt=PROMPT[:3], k=2, seed=2, temperature=0.7, max_tokens=4),
            dict(prompt=PROMPT[:1], k=3, seed=3), dict(k=5, seed=4, top_k=20, max_tokens=5, num_samples=2)]
    together = [_ask(sampler, **ask) for ask in asks]  # in flight at once: the trainer decodes them together
    for ask, future in zip(asks, together, strict=True):
        got, alone = future.result(), _ask(sampler, **ask).result()
        assert _alts(got)[0].tolist() == _alts(alone)[0].tolist(), ask
        np.testing.assert_allclose(_alts(got)[1], _alts(alone)[1], rtol=1e-4, atol=1e-5)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in alone.sequences]


def test_a_one_token_prompt_gets_empty_rows(sampler: tinker.SamplingClient) -> None:
    tokens, logprobs = _alts(_ask(sampler, PROMPT[:1], k=3, seed=1).result())
    assert tokens.shape == logprobs.shape == (0, 3)


def test_bounds_are_refused_clearly_and_sampling_goes_on(sampler: tinker.SamplingClient) -> None:
    longest = MAX_PROMPT_ALT_TOKEN_CELLS // MAX_PROMPT_ALT_TOKENS_K + 1  # exactly the cap at the largest k
    assert prompt_alt_tokens_problem(MAX_PROMPT_ALT_TOKENS_K, longest) is None  # the trainer's own check agrees
    refused = [(dict(k=MAX_PROMPT_ALT_TOKENS_K + 1), f"less than or equal to {MAX_PROMPT_ALT_TOKENS_K}"),
               (dict(prompt=[7] * (longest + 1), k=MAX_PROMPT_ALT_TOKENS_K), f"at most {MAX_PROMPT_ALT_TOKEN_CELLS}")]
    for ask, phrase in refused:
        with pytest.raises(tinker.BadRequestError, match=phrase):
            _ask(sampler, **ask).result()
    with pytest.raises(ValueError, match="prompt_alt_tokens_k"):  # the SDK's own check, before sending
        _ask(sampler, k=-1)
    tokens, _ = _alts(_ask(sampler, k=MAX_PROMPT_ALT_TOKENS_K, seed=1).result())  # the largest k, within the cells
    assert tokens.shape == (len(PROMPT) - 1, MAX_PROMPT_ALT_TOKENS_K)
