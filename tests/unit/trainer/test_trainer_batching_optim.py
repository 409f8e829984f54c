"""Padding, the data-parallel split, and AdamW against torch's own AdamW + clip_grad_norm_."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tinkerkube_contract.pod_api import AdamParams
from tinkerkube_trainer.batching import collate, micro_batches, shard_bounds
from tinkerkube_trainer.codec import DatumData
from tinkerkube_trainer.optim import LoraOptimizer, all_finite


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_contiguous_balanced_and_cover_everything(n: int, world: int) -> None:
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1 and all(s >= 0 for s in sizes)


def test_bad_shard_request_is_refused() -> None:
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def _datum(tokens: list[int], **floats: list[float]) -> DatumData:
    inputs = {"target_tokens": np.array([*tokens[1:], 0], dtype=np.int64)}
    inputs.update({k: np.array(v, dtype=np.float32) for k, v in floats.items()})
    return DatumData(tokens=np.array(tokens, dtype=np.int64), inputs=inputs)


def test_collate_right_pads_and_masks() -> None:
    batch = collate([_datum([5, 6, 7], weights=[1, 2, 3]), _datum([8], weights=[4])], pad_id=9)
    assert batch.lengths == [3, 1]
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 0], [0, 0, 0]]
    assert batch.float_inputs["weights"].tolist() == [[1, 2, 3], [4, 0, 0]]


def test_collate_of_nothing_is_an_empty_batch() -> None:
    assert tuple(collate([]).input_ids.shape) == (0, 0)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_optimizer_steps_like_torch_adamw_with_clipping(clip: float) -> None:
    ours, ref = _params(0), _params(0)
    opt = LoraOptimizer(ours)
    ref_opt = torch.optim.AdamW(ref, lr=1.0)
    schedule = [AdamParams(learning_rate=lr, weight_decay=wd, grad_clip_norm=clip, beta2=0.99, eps=1e-8)
                for lr, wd in [(0.1, 0.0), (0.05, 0.1), (0.02, 0.3)]]
    g = torch.Generator().manual_seed(1)
    for hp in schedule:
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        expected_norm = float(torch.nn.utils.clip_grad_norm_(ref, clip if clip > 0 else float("inf")))
        for group in ref_opt.param_groups:
            group.update(lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=(hp.beta1, hp.beta2), eps=hp.eps)
        ref_opt.step()
        ref_opt.zero_grad()
        metrics = opt.step(hp)
        assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            assert p.grad is None


def test_optimizer_state_round_trips() -> None:
    params = _params(2)
    opt = LoraOptimizer(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step(AdamParams(learning_rate=0.1))
    clone = LoraOptimizer(_params(2))
    clone.load_state_dict(opt.state_dict())
    assert clone.steps == 1
    for a, b in zip(clone.torch_opt.state.values(), opt.torch_opt.state.values(), strict=True):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])


def test_micro_batches_keep_order_and_respect_the_budget() -> None:
    datums = [_datum(list(range(n))) for n in (3, 5, 2, 8, 4)]
    assert micro_batches(datums, 1000) == [datums]  # fits: one forward
    groups = micro_batches(datums, 10)
    assert [d for g in groups for d in g] == datums
    assert all(len(g) * max(len(d.tokens) for d in g) <= 10 or len(g) == 1 for g in groups)
    assert [len(g) for g in groups] == [2, 1, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_among_many_tensors(dtype: torch.dtype, bad: float) -> None:
    rng = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 7, generator=rng).to(dtype) for _ in range(9)] + [torch.zeros(0, 3, dtype=dtype)]
    assert all_finite(tensors)
    for which in (0, 4, 8):
        spoiled = [t.clone() for t in tensors]
        spoiled[which].view(-1)[which * 3] = bad
        assert not all_finite(spoiled)
        assert not bool(torch.stack([torch.isfinite(t).all() for t in spoiled]).all())  # the plain definition


def test_all_finite_takes_huge_finite_values_and_nothing() -> None:
    big = torch.finfo(torch.float32).max
    assert all_finite([torch.full((64, 64), big), torch.full((3,), -big)])  # a sum would overflow; max does not
    assert all_finite([]) and all_finite([torch.zeros(0)])
