"""Prompt alternatives (`prompt_alt_tokens_k`) drawn from given logits: shapes, the draw rule, their logprobs
and their own seeded generator."""

from __future__ import annotations

import numpy as np
import torch

from tinkerkube_trainer.codec import SampleParams
from tinkerkube_trainer.token_draw import ALT_ROWS_AT_ONCE, draw_prompt_alternatives

V = 6


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def _alts(logits: torch.Tensor, **params: object) -> dict[str, np.ndarray]:
    p = SampleParams(prompt=tuple(range(logits.shape[0])), **params)  # type: ignore[arg-type]
    return draw_prompt_alternatives(logits, torch.log_softmax(logits, dim=-1), p)


def test_shapes_dtypes_and_logprobs_at_temperature_one() -> None:
    logits = _logits(5)
    out = _alts(logits, prompt_alt_tokens_k=7, temperature=0.6, seed=3)
    assert out["alt_tokens"].shape == out["alt_logprobs"].shape == (4, 7)  # no row for position 0
    assert out["alt_tokens"].dtype == np.int64 and out["alt_logprobs"].dtype == np.float32
    assert out["alt_tokens"].min() >= 0 and out["alt_tokens"].max() < V
    logp = torch.log_softmax(logits, dim=-1).numpy()  # temperature 1, whatever the draws used
    np.testing.assert_allclose(out["alt_logprobs"], np.take_along_axis(logp[:-1], out["alt_tokens"], axis=1),
                               rtol=1e-6)


def test_temperature_zero_and_top_k_one_repeat_the_argmax() -> None:
    logits = _logits(6, seed=1)
    best = logits[:-1].argmax(dim=-1).numpy()
    for params in ({"temperature": 0.0}, {"top_k": 1, "seed": 5}, {"top_p": 1e-6, "seed": 5}):
        out = _alts(logits, prompt_alt_tokens_k=4, **params)
        assert (out["alt_tokens"] == best[:, None]).all(), params


def test_a_seed_repeats_its_draws_and_another_seed_does_not() -> None:
    logits = torch.zeros(40, V)  # uniform: every draw is a coin toss
    first = _alts(logits, prompt_alt_tokens_k=8, seed=11)["alt_tokens"]
    assert (first == _alts(logits, prompt_alt_tokens_k=8, seed=11)["alt_tokens"]).all()
    assert not (first == _alts(logits, prompt_alt_tokens_k=8, seed=12)["alt_tokens"]).all()
    assert len(np.unique(first)) == V  # with replacement, from the whole vocabulary


def test_draws_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(201, 1)  # p(0) = e^3 / (e^3 + 5) = 0.80
    hot = _alts(logits, prompt_alt_tokens_k=64, seed=2)["alt_tokens"]
    cold = _alts(logits, prompt_alt_tokens_k=64, seed=2, temperature=0.25)["alt_tokens"]  # p(0) = 0.99997
    share = (hot == 0).mean()
    assert 0.77 < share < 0.83, share  # 12800 draws: the binomial's sd is 0.0035
    assert (cold == 0).mean() > 0.999
    assert set(np.unique(hot)) == set(range(V))


def test_long_prompts_are_drawn_in_chunks_and_one_token_prompts_get_no_rows() -> None:
    logits = _logits(ALT_ROWS_AT_ONCE + 3, seed=4)
    out = _alts(logits, prompt_alt_tokens_k=2, temperature=0.0)
    assert out["alt_tokens"].shape == (ALT_ROWS_AT_ONCE + 2, 2)
    assert (out["alt_tokens"][:, 0] == logits[:-1].argmax(dim=-1).numpy()).all()
    one = _alts(_logits(1), prompt_alt_tokens_k=3, seed=1)
    assert one["alt_tokens"].shape == one["alt_logprobs"].shape == (0, 3)
