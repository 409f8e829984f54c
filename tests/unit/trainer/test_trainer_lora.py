"""Where adapters go, that their initialisation is peft's (seeded, global RNG untouched), and that routed
rows each meet only their own adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer.lora import target_modules
from tinkerkube_trainer.multilora import AdapterSites, RowGroup, peft_state_dict


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


def _ours(seed: int, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    sites = AdapterSites.install(base or LlamaLike())
    return peft_state_dict(sites.new_adapter(LoraSpec(rank=2, alpha=4.0), seed=seed, device=torch.device("cpu")))


def _peft(seed: int) -> dict[str, torch.Tensor]:
    config = LoraConfig(r=2, lora_alpha=4.0, lora_dropout=0.0, target_modules=target_modules(LlamaLike(),
                        LoraSpec()), task_type="CAUSAL_LM")
    base = LlamaLike()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    return {k: v for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def test_adapter_init_is_peft_s_seeded_init_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    base = LlamaLike()
    state = torch.get_rng_state()
    first = _ours(7, base)
    assert torch.equal(state, torch.get_rng_state())
    reference = _peft(7)
    assert first.keys() == reference.keys() and len(first) == 16  # A and B for 8 modules, peft's key names
    assert all(torch.equal(first[k], reference[k]) for k in first)  # bit for bit what peft would start from
    other = _ours(8)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert all(t.abs().sum() == 0 for k, t in first.items() if "lora_B" in k)  # starts as the identity


def test_routed_rows_each_meet_their_own_adapter_only() -> None:
    torch.manual_seed(0)
    model = LlamaLike()
    sites = AdapterSites.install(model)
    a = sites.new_adapter(LoraSpec(rank=2, alpha=4.0), seed=1, device=torch.device("cpu"))
    b = sites.new_adapter(LoraSpec(rank=3, alpha=3.0, train_mlp=False), seed=2, device=torch.device("cpu"))
    for weights in (a, b):
        for _, up in weights.layers.values():
            with torch.no_grad():
                up.normal_()
    x = torch.randn(5, 8)
    with sites.routing.route([RowGroup(0, 2, a)]):
        alone_a = model(x[:2])
    with sites.routing.route([RowGroup(0, 2, b)]):
        alone_b = model(x[3:])
    base = model(x[2:3])
    with sites.routing.route([RowGroup(0, 2, a), RowGroup(3, 5, b)]):  # row 2: the base model alone
        mixed = model(x)
    torch.testing.assert_close(mixed[:2], alone_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2:3], base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[3:], alone_b, rtol=1e-6, atol=1e-6)
    mixed[:2].sum().backward()
    assert all(t.grad is not None for t in a.parameters()[:2])
    assert all(t.grad is None or t.grad.abs().sum() == 0 for t in b.parameters())
