"""Tinker's losses against hand-written references (values per token and autograd gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.losses import (
    LOSSES,
    LossConfig,
    LossInputs,
    canonical_loss_name,
    parse_config,
    reduce_sum,
)

CFG = LossConfig(clip_low=0.8, clip_high=1.2, beta=0.1)


def _inputs(seed: int = 0, b: int = 3, t: int = 5) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    slp = lp.detach() + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios on both sides
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    slp[mask == 0] = 50.0  # garbage on padding must not leak (exp(50) overflow·0 would give NaN/inf)
    return LossInputs(
        target_logprobs=lp.requires_grad_(True),
        mask=mask,
        weights=torch.randn(b, t, generator=g, dtype=torch.float64),
        sampling_logprobs=slp,
        advantages=torch.randn(b, t, generator=g, dtype=torch.float64),
    )


def _reference(name: str, lp: float, slp: float, a: float, w: float, cfg: LossConfig) -> tuple[float, float]:
    """(per-token loss, d loss / d lp) written out by hand from tinker-protocol.md §5.2."""
    r = math.exp(lp - slp)
    clip = min(max(r, cfg.clip_low), cfg.clip_high)
    if name == "cross_entropy":
        return -lp * w, -w
    if name == "importance_sampling":
        return -r * a, -r * a
    if name == "ppo":
        unclipped, clipped = r * a, clip * a
        return -min(unclipped, clipped), (-r * a if unclipped <= clipped else 0.0)
    if name == "cispo":
        return -clip * lp * a, -clip * a
    if name == "dro":
        return -(lp * a - 0.5 * cfg.beta * (lp - slp) ** 2), -(a - cfg.beta * (lp - slp))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"])
def test_per_token_loss_and_gradient_match_reference(name: str) -> None:
    x = _inputs()
    per_token = LOSSES[name](x, CFG)
    (grad,) = torch.autograd.grad(reduce_sum(per_token), x.target_logprobs)
    assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
    for i in range(per_token.shape[0]):
        for j in range(per_token.shape[1]):
            if x.mask[i, j] == 0:
                assert per_token[i, j].item() == 0.0 and grad[i, j].item() == 0.0
                continue
            args = (x.target_logprobs[i, j].item(), x.sampling_logprobs[i, j].item(),  # type: ignore[index]
                    x.advantages[i, j].item(), x.weights[i, j].item())  # type: ignore[index]
            want_loss, want_grad = _reference(name, *args, CFG)
            assert per_token[i, j].item() == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
            assert grad[i, j].item() == pytest.approx(want_grad, rel=1e-9, abs=1e-12)


def test_ppo_clips_in_both_directions_in_this_fixture() -> None:
    x = _inputs()
    r = torch.exp(x.target_logprobs - x.sampling_logprobs)[x.mask > 0]  # type: ignore[operator]
    assert (r < CFG.clip_low).any() or (r > CFG.clip_high).any(), "fixture must exercise the clip"


def test_gspo_uses_one_sequence_ratio_with_per_token_gradient() -> None:
    x = _inputs(seed=3)
    x.sequence_ratio_mask = torch.ones_like(x.mask)
    per_token = LOSSES["gspo"](x, CFG)
    (grad,) = torch.autograd.grad(reduce_sum(per_token), x.target_logprobs)
    for i in range(per_token.shape[0]):
        real = [j for j in range(per_token.shape[1]) if x.mask[i, j] > 0]
        mean = sum(x.target_logprobs[i, j].item() - x.sampling_logprobs[i, j].item() for j in real) / len(real)  # type: ignore[index]
        s = math.exp(mean)
        clip = min(max(s, CFG.clip_low), CFG.clip_high)
        for j in real:
            a = x.advantages[i, j].item()  # type: ignore[index]
            unclipped, clipped = s * a, clip * a
            assert per_token[i, j].item() == pytest.approx(-min(unclipped, clipped), rel=1e-9)
            assert grad[i, j].item() == pytest.approx(-s * a if unclipped <= clipped else 0.0, rel=1e-9, abs=1e-12)


def test_cross_entropy_without_weights_counts_every_token_once() -> None:
    x = _inputs()
    x.weights = None
    assert reduce_sum(LOSSES["cross_entropy"](x, CFG)).item() == pytest.approx(
        -(x.target_logprobs * x.mask).sum().item()
    )


def test_per_token_thresholds_override_the_config() -> None:
    x = _inputs()
    x.clip_low = torch.full_like(x.mask, 0.99)
    x.clip_high = torch.full_like(x.mask, 1.01)
    narrow = LossConfig(clip_low=0.99, clip_high=1.01)
    assert torch.equal(LOSSES["ppo"](x, CFG), LOSSES["ppo"](_inputs(), narrow))


def test_losses_sum_rather_than_average() -> None:
    x = _inputs()
    twice = LossInputs(
        target_logprobs=torch.cat([x.target_logprobs, x.target_logprobs]),
        mask=torch.cat([x.mask, x.mask]),
        weights=torch.cat([x.weights, x.weights]),  # type: ignore[list-item]
    )
    once = reduce_sum(LOSSES["cross_entropy"](x, CFG))
    assert reduce_sum(LOSSES["cross_entropy"](twice, CFG)).item() == pytest.approx(2 * once.item())


def test_stable_reinforce_is_served_as_importance_sampling() -> None:
    assert canonical_loss_name("stable_reinforce") == "importance_sampling"
    assert canonical_loss_name("ppo") == "ppo"


@pytest.mark.parametrize("name", ["custom", "nope", ""])
def test_unknown_loss_is_a_user_error(name: str) -> None:
    with pytest.raises(OpError) as err:
        canonical_loss_name(name)
    assert err.value.category == "user" and err.value.code == "unknown_loss"


def test_config_v2_wins_and_defaults_apply() -> None:
    assert parse_config({}, {}) == LossConfig(clip_low=0.8, clip_high=1.2, beta=0.05)
    legacy = {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}
    cfg = parse_config({"clip_low_threshold": 0.7, "beta": 0.2}, legacy)
    assert (cfg.clip_low, cfg.clip_high, cfg.beta) == (0.7, 1.5, 0.2)


@pytest.mark.parametrize("bad", [{"beta": "high"}, {"clip_low_threshold": 1.5, "clip_high_threshold": 1.1}])
def test_bad_config_is_a_user_error(bad: dict) -> None:
    with pytest.raises(OpError):
        parse_config(bad, {})
