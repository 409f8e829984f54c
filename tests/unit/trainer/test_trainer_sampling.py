"""Stop handling and filtering in the sampling loop, driven by a scripted stand-in model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tinkerkube_trainer.codec import SampleParams
from tinkerkube_trainer.sampling import sample
from tinkerkube_trainer.token_draw import filter_logits

VOCAB = ["a", "b", "c", "\n\nUs", "er:", "User:", "x", "<eos>"]
EOS = 7


@dataclass
class _Out:
    logits: torch.Tensor
    past_key_values: object


@dataclass
class RowCache:
    """Like transformers' DynamicCache for what the loop uses: select rows (repeating the prefill's row
    once per sample, then dropping finished ones). A repeated row becomes a new sample (its own script)."""

    seen: int
    rows: list[int]

    def batch_select_indices(self, index: torch.Tensor) -> None:
        picked = index.tolist()
        repeated = len(set(picked)) < len(picked)
        self.rows = list(range(len(picked))) if repeated else [self.rows[i] for i in picked]


class ScriptedModel(torch.nn.Module):
    """Sample i emits scripts[i][t] at generation step t (near-certainly: logit 50 vs 0).
    `row_cache=False` returns a plain dict cache, which the loop can neither repeat nor shrink."""

    prompt_len = 2

    def __init__(self, *scripts: list[int], row_cache: bool = False):
        super().__init__()
        self.scripts, self.row_cache, self.batch_sizes = scripts, row_cache, []

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True, **_: object) -> _Out:
        b, length = input_ids.shape
        self.batch_sizes.append(b)
        if self.row_cache:
            cache = past_key_values or RowCache(0, list(range(b)))
            assert len(cache.rows) == b
            seen, rows = cache.seen, cache.rows
            cache.seen += length
        else:
            seen, rows = (past_key_values or {"seen": 0})["seen"], list(range(b))
            cache = {"seen": seen + length}
        logits = torch.zeros(b, length, len(VOCAB))
        step = seen + length - self.prompt_len
        for pos, row in enumerate(rows):
            script = self.scripts[row % len(self.scripts)]
            logits[pos, -1, script[min(step, len(script) - 1)]] = 50.0
        return _Out(logits, cache)


def _run(model: ScriptedModel, **kw) -> list[tuple[list[int], bool]]:
    params = SampleParams(prompt=(0, 1), **{"max_tokens": 8, "seed": 0, **kw})
    result = sample(model, params, eos_ids=[EOS], decode=lambda ids: "".join(VOCAB[i] for i in ids),
                    device=torch.device("cpu"))
    return [(s.tokens, s.stopped) for s in result.sequences]


def test_stop_token_ends_at_its_first_occurrence_and_is_included_once() -> None:
    assert _run(ScriptedModel([0, 2, 1, 2, 1]), stop_tokens=(2,)) == [([0, 2], True)]


def test_stop_string_spanning_tokens_is_completed_then_stops() -> None:
    assert _run(ScriptedModel([0, 3, 4, 0, 3, 4]), stop_strings=("\n\nUser:",)) == [([0, 3, 4], True)]


def test_stop_string_inside_one_token_stops_there() -> None:
    assert _run(ScriptedModel([0, 1, 5, 5]), stop_strings=("User:",)) == [([0, 1, 5], True)]


def test_no_stop_given_means_eos() -> None:
    assert _run(ScriptedModel([0, 1, EOS, 2])) == [([0, 1, EOS], True)]


def test_explicit_stops_still_end_at_eos() -> None:
    assert _run(ScriptedModel([0, EOS, 2]), stop_tokens=(2,)) == [([0, EOS], True)]


def test_empty_stop_list_never_stops_not_even_at_eos() -> None:
    tokens, stopped = _run(ScriptedModel([0, EOS, EOS, 1]), stop_tokens=(), stop_strings=(), max_tokens=6)[0]
    assert tokens == [0, EOS, EOS, 1, 1, 1] and not stopped


def test_max_tokens_is_a_length_stop() -> None:
    assert _run(ScriptedModel([1]), max_tokens=3) == [([1, 1, 1], False)]
    assert _run(ScriptedModel([1]), max_tokens=0) == [([], False)]


@pytest.mark.parametrize("row_cache", [False, True])
def test_samples_stop_independently(row_cache: bool) -> None:
    # The first token comes from the one shared prefill, so every script starts alike.
    model = ScriptedModel([0, EOS], [0, 1, 1, EOS], [0, 2, 2, 2, 2, 2], row_cache=row_cache)
    out = _run(model, num_samples=3, max_tokens=6)
    assert out == [([0, EOS], True), ([0, 1, 1, EOS], True), ([0, 2, 2, 2, 2, 2], False)]
    if row_cache:  # one prefill, then finished rows leave the batch
        assert model.batch_sizes == [1, 3, 2, 2, 1, 1]


def test_top_k_sample_logprobs_rank_the_distribution_at_each_step() -> None:
    params = SampleParams(prompt=(0, 1), max_tokens=3, topk_sample_logprobs=2, stop_tokens=(), stop_strings=())
    seq = sample(ScriptedModel([4, 5, 6]), params, eos_ids=[EOS], decode=str, device=torch.device("cpu")).sequences[0]
    assert seq.topk_ids is not None and seq.topk_ids.shape == (3, 2)
    assert seq.topk_ids[:, 0].tolist() == [4, 5, 6]
    assert (seq.topk_logprobs[:, 0] >= seq.topk_logprobs[:, 1]).all()


def test_greedy_at_temperature_zero() -> None:
    assert _run(ScriptedModel([2, 1, EOS]), temperature=0.0) == [([2, 1, EOS], True)]


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_nucleus_and_at_least_one() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    assert torch.isfinite(filter_logits(logits, -1, 0.7)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_logits(logits, -1, 0.01)).tolist() == [[False, True, False, False]]


def test_seeded_draws_repeat_and_leave_the_global_rng_alone() -> None:
    class Uniform(ScriptedModel):
        def forward(self, input_ids, past_key_values=None, use_cache=True, **_):
            return _Out(torch.zeros(*input_ids.shape, len(VOCAB)), {"seen": 0})

    before = torch.get_rng_state()
    first = _run(Uniform([0]), seed=5, stop_tokens=(), stop_strings=(), num_samples=3)
    assert torch.equal(before, torch.get_rng_state())
    assert first == _run(Uniform([0]), seed=5, stop_tokens=(), stop_strings=(), num_samples=3)
    assert first != _run(Uniform([0]), seed=6, stop_tokens=(), stop_strings=(), num_samples=3)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_returned_logprobs_are_the_temperature_one_logprobs(temperature: float) -> None:
    class Fixed(ScriptedModel):
        def forward(self, input_ids, past_key_values=None, use_cache=True, **_):
            logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05, 0, 0, 0]) + 1e-30)
            return _Out(logits.expand(*input_ids.shape, len(VOCAB)).clone(), {"seen": 0})

    params = SampleParams(prompt=(0, 1), max_tokens=4, seed=1, temperature=temperature, stop_tokens=(), stop_strings=())
    seq = sample(Fixed([0]), params, eos_ids=[EOS], decode=str, device=torch.device("cpu")).sequences[0]
    expected = torch.log_softmax(torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05, 0, 0, 0]) + 1e-30), -1)
    assert seq.logprobs == pytest.approx([expected[t].item() for t in seq.tokens], rel=1e-6)


def test_stop_string_is_found_late_in_a_long_generation() -> None:
    script = [0, 1, 2] * 20 + [3, 4, 6]
    tokens, stopped = _run(ScriptedModel(script), stop_strings=("\n\nUser:",), max_tokens=100)[0]
    assert tokens == script[:-1] and stopped
