"""Which layers a LoraSpec adapts (peft's `target_modules`), and the default adapter seed.

Why a fixed default seed: every data-parallel rank builds its own adapter, and Tinker's LoRA B starts
at zero but A is random; ranks must start from identical weights, so an unset seed means seed 0, not
"whatever the RNG holds" (`multilora` draws from a private generator seeded with it).
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from tinkerkube_contract.resource import LoraSpec

DEFAULT_SEED = 0
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# Name fragments for architectures without Llama-style names (GPT-2, Falcon, MPT, ...).
_ATTN_HINTS = ("attn", "attention", "query", "key", "value", "qkv", "c_proj", "out_proj", "dense")
_MLP_HINTS = ("mlp", "fc", "ffn", "feed_forward", "c_fc", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h")


def _linear_names(model: nn.Module) -> list[str]:
    # transformers' Conv1D is GPT-2's Linear (weights transposed); peft adapts both.
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear | Conv1D)]


def target_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Module names to adapt (peft's `target_modules`); see `targets_among`."""
    return targets_among(_linear_names(model), spec)


def targets_among(linear: list[str], spec: LoraSpec) -> list[str]:
    """Module names to adapt, given the model's linear layer paths. Llama/Qwen-family leaf names when
    the model has them; otherwise the full path of every Linear layer under an attention or MLP block
    (full paths, because other families reuse leaf names across blocks, e.g. GPT-2's `attn.c_proj`
    and `mlp.c_proj`). Raises ValueError when the spec selects nothing."""
    leaves = {name.rsplit(".", 1)[-1] for name in linear}
    chosen: list[str] = []
    if leaves & set(ATTN_MODULES + MLP_MODULES):
        if spec.train_attn:
            chosen += [m for m in ATTN_MODULES if m in leaves]
        if spec.train_mlp:
            chosen += [m for m in MLP_MODULES if m in leaves]
    else:
        for name in linear:
            parts = name.lower().split(".")
            if parts[-1] in UNEMBED_MODULES:
                continue
            is_mlp = any(h in part for part in parts for h in _MLP_HINTS)
            is_attn = not is_mlp and any(h in part for part in parts for h in _ATTN_HINTS)
            if (spec.train_mlp and is_mlp) or (spec.train_attn and is_attn):
                chosen.append(name)
    if spec.train_unembed:
        chosen += [m for m in UNEMBED_MODULES if m in leaves]
    if not chosen:
        raise ValueError("the LoRA spec selects no module of this model: enable trainAttn, trainMlp or trainUnembed")
    return chosen
