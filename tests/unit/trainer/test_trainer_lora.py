"""Where adapters go, and that their initialisation is seeded without touching the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer.lora import attach_adapter, lora_parameters, target_modules


class _Block(nn.Module):
    def __init__(self, attn: dict[str, nn.Module], mlp: dict[str, nn.Module]):
        super().__init__()
        self.self_attn = nn.ModuleDict(attn)
        self.mlp = nn.ModuleDict(mlp)


class LlamaLike(nn.Module):
    def __init__(self):
        super().__init__()
        lin = lambda: nn.Linear(8, 8)  # noqa: E731
        self.layers = nn.ModuleList([_Block({n: lin() for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                                            {n: lin() for n in ("gate_proj", "up_proj", "down_proj")})])
        self.lm_head = nn.Linear(8, 16)

    def forward(self, x):
        return self.lm_head(self.layers[0].mlp["down_proj"](self.layers[0].self_attn["q_proj"](x)))

    def prepare_inputs_for_generation(self, *args, **kwargs):  # what peft's causal-LM wrapper expects
        return kwargs


class Gpt2Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([nn.ModuleDict({
            "attn": nn.ModuleDict({"c_attn": Conv1D(24, 8), "c_proj": Conv1D(8, 8)}),
            "mlp": nn.ModuleDict({"c_fc": Conv1D(32, 8), "c_proj": Conv1D(8, 32)}),
        })])
        self.lm_head = nn.Linear(8, 16)


@pytest.mark.parametrize(("spec", "expected"), [
    (LoraSpec(), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    (LoraSpec(train_mlp=False, train_unembed=False), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (LoraSpec(train_attn=False, train_unembed=False), ["gate_proj", "up_proj", "down_proj"]),
    (LoraSpec(train_attn=False, train_mlp=False), ["lm_head"]),
])
def test_llama_family_targets_follow_the_spec(spec: LoraSpec, expected: list[str]) -> None:
    assert target_modules(LlamaLike(), spec) == expected


def test_other_architectures_get_full_paths_per_block_kind() -> None:
    model = Gpt2Like()
    assert target_modules(model, LoraSpec(train_mlp=False, train_unembed=False)) == ["h.0.attn.c_attn",
                                                                                     "h.0.attn.c_proj"]
    assert target_modules(model, LoraSpec(train_attn=False)) == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "lm_head"]


def test_selecting_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="selects no module"):
        target_modules(LlamaLike(), LoraSpec(train_attn=False, train_mlp=False, train_unembed=False))


def _adapter(seed: int | None, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    model = attach_adapter(base or LlamaLike(), LoraSpec(rank=2, alpha=4.0, seed=seed))
    return {n: p.detach().clone() for n, p in lora_parameters(model)}


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    base = LlamaLike()
    state = torch.get_rng_state()
    first = _adapter(7, base)
    assert torch.equal(state, torch.get_rng_state())
    again, other, default = _adapter(7), _adapter(8), _adapter(None)
    assert first.keys() == again.keys() and len(first) == 16  # A and B for 8 modules
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert all(torch.equal(default[k], _adapter(0)[k]) for k in default)  # unset seed = 0 on every rank
    assert all(t.abs().sum() == 0 for k, t in first.items() if "lora_B" in k)  # starts as the identity
