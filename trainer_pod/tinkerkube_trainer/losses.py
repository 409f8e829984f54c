"""Tinker's per-token losses (tinker-protocol.md §5.2), pure torch, no host syncs.

Why this shape: each loss maps padded `(B, T)` tensors to a `(B, T)` per-token loss that is zero on
padding; `reduce_sum` is the one place that sums. Tinker sums over tokens and datums, never averages,
so gradients of two half-batches add up to the gradient of the whole batch, and data-parallel ranks
can simply all-reduce-sum their gradients.

`stable_reinforce` relies on server-recorded sampling information that is not public. It is mapped to
`importance_sampling` (same inputs, the objective it refines), so that the cookbook's math_rl recipe,
which selects it by default, runs unchanged; `canonical_loss_name` documents the mapping in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tinkerkube_trainer.engine_api import OpError

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
DEFAULT_DRO_BETA = 0.05  # the docs' example; Tinker documents no default

RL_INPUTS = ("target_tokens", "logprobs", "advantages")
REQUIRED_INPUTS: Mapping[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),  # weights default to 1
    "importance_sampling": RL_INPUTS,
    "ppo": RL_INPUTS,
    "cispo": RL_INPUTS,
    "dro": RL_INPUTS,
    "gspo": RL_INPUTS,  # sequence_ratio_mask defaults to the padding mask
}
ALIASES: Mapping[str, str] = {"stable_reinforce": "importance_sampling"}
FLOAT_INPUTS = ("weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold", "sequence_ratio_mask")


@dataclass(frozen=True, slots=True)
class LossConfig:
    clip_low: float = DEFAULT_CLIP_LOW
    clip_high: float = DEFAULT_CLIP_HIGH
    beta: float = DEFAULT_DRO_BETA


@dataclass(slots=True)
class LossInputs:
    """Padded `(B, T)` tensors. `mask` is 1.0 on real tokens, 0.0 on padding; optional inputs are None."""

    target_logprobs: torch.Tensor  # carries the gradient
    mask: torch.Tensor
    weights: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    clip_low: torch.Tensor | None = None  # per-token thresholds, when sent as loss_fn_inputs
    clip_high: torch.Tensor | None = None
    sequence_ratio_mask: torch.Tensor | None = None


LossFn = Callable[[LossInputs, LossConfig], torch.Tensor]


def canonical_loss_name(name: str) -> str:
    """The implemented loss for a requested name; OpError (user) for anything unknown."""
    name = ALIASES.get(name, name)
    if name not in LOSSES:
        raise OpError(
            f"unknown loss_fn {name!r}: supported are {', '.join(sorted([*LOSSES, *ALIASES]))}",
            code="unknown_loss",
        )
    return name


def parse_config(config_v2: Mapping[str, float | str], legacy: Mapping[str, float]) -> LossConfig:
    """v2 wins over the legacy numbers-only map; unknown keys are ignored (the SDK may add more)."""
    merged: dict[str, float | str] = {**legacy, **config_v2}

    def number(key: str, default: float) -> float:
        value = merged.get(key, default)
        if isinstance(value, str):
            raise OpError(f"loss_fn_config[{key!r}] must be a number, got {value!r}", code="invalid_loss_config")
        if not math.isfinite(float(value)):
            raise OpError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}", code="invalid_loss_config")
        return float(value)

    cfg = LossConfig(
        clip_low=number("clip_low_threshold", DEFAULT_CLIP_LOW),
        clip_high=number("clip_high_threshold", DEFAULT_CLIP_HIGH),
        beta=number("beta", DEFAULT_DRO_BETA),
    )
    if cfg.clip_low > cfg.clip_high:
        raise OpError("clip_low_threshold must not exceed clip_high_threshold", code="invalid_loss_config")
    return cfg


def _need(t: torch.Tensor | None, name: str) -> torch.Tensor:
    if t is None:  # prepare() validates inputs; this guards direct callers
        raise OpError(f"missing loss_fn_inputs[{name!r}]", code="missing_loss_input")
    return t


def _thresholds(x: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    lo = x.clip_low if x.clip_low is not None else cfg.clip_low
    hi = x.clip_high if x.clip_high is not None else cfg.clip_high
    return lo, hi


def _ratio(x: LossInputs) -> torch.Tensor:
    # Padding may hold anything; mask before exp so padded positions never overflow to inf·0 = NaN.
    delta = (x.target_logprobs - _need(x.sampling_logprobs, "logprobs")) * x.mask
    return torch.exp(delta)


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float):
    clipped = torch.clamp(ratio, min=lo, max=hi)
    return -torch.minimum(ratio * adv, clipped * adv)


def cross_entropy(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """`-lp·w`; missing weights mean 1 (a plain call); any real weights are allowed (custom losses).
    With `(B, T, K)` top-K targets the loss is per slot, `(B, T, K)`."""
    w = x.weights if x.weights is not None else torch.ones_like(x.target_logprobs)
    mask = x.mask if x.mask.dim() == x.target_logprobs.dim() else x.mask.unsqueeze(-1)
    return -x.target_logprobs * w * mask


def importance_sampling(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """`-r·A` with `r = exp(lp - slp)`."""
    return -_ratio(x) * _need(x.advantages, "advantages") * x.mask


def ppo(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """`-min(r·A, clip(r, lo, hi)·A)`."""
    lo, hi = _thresholds(x, cfg)
    return _clipped_surrogate(_ratio(x), _need(x.advantages, "advantages"), lo, hi) * x.mask


def cispo(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """`-sg(clip(r, lo, hi))·lp·A`: the clipped ratio only weighs the policy-gradient term."""
    lo, hi = _thresholds(x, cfg)
    weight = torch.clamp(_ratio(x), min=lo, max=hi).detach()
    return -weight * x.target_logprobs * _need(x.advantages, "advantages") * x.mask


def dro(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """`-(lp·A - ½·beta·(lp - slp)²)`."""
    diff = (x.target_logprobs - _need(x.sampling_logprobs, "logprobs")) * x.mask
    return -(x.target_logprobs * _need(x.advantages, "advantages") - 0.5 * cfg.beta * diff * diff) * x.mask


def gspo(x: LossInputs, cfg: LossConfig) -> torch.Tensor:
    """GSPO-token: a per-sequence ratio `s` (geometric mean over the ratio mask) that carries each
    token's own gradient, `s_t = s·exp(lp - sg(lp))`, then the PPO clipped surrogate."""
    lo, hi = _thresholds(x, cfg)
    seq_mask = x.mask if x.sequence_ratio_mask is None else (x.sequence_ratio_mask != 0).to(x.mask.dtype) * x.mask
    lp = x.target_logprobs
    delta = (lp.detach() - _need(x.sampling_logprobs, "logprobs")) * seq_mask
    count = seq_mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    s = torch.exp(delta.sum(dim=-1, keepdim=True) / count)
    s_t = s * torch.exp(lp - lp.detach())
    return _clipped_surrogate(s_t, _need(x.advantages, "advantages"), lo, hi) * x.mask


LOSSES: Mapping[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def reduce_sum(per_token: torch.Tensor) -> torch.Tensor:
    """Tinker's reduction: a plain sum over tokens and datums (a 0-d tensor; no host sync)."""
    return per_token.sum()
