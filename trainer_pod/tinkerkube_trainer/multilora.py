"""Many LoRA adapters over one resident base model: routed layers, per-run adapters, PEFT-format I/O.

Why our own layers instead of peft's: a trainer pool holds one base model and many runs' adapters,
and ops of different runs that are pending together run as ONE forward/backward over their
concatenated rows, each row through its own run's adapter. peft refuses mixed-adapter batches in
training mode and switching its active adapter costs ~25 ms a call; here an adapter is just tensors
held by its run (`LoraWeights`), and every adaptable linear layer of the base is wrapped once by a
`RoutedLinear` that adds, per contiguous row group, that group's `B(A(x)) * alpha / r`. Rows of one
run only ever meet that run's tensors, so its gradients, loss and outputs are what it would get
alone (the base matmul over more rows differs only in float rounding).

The maths and initialisation are peft's (A kaiming-uniform after peft's two nn.Linear inits, B zero,
scale alpha/r, no dropout), and checkpoints use peft's key names and adapter_config.json, so an
exported adapter loads in plain `PeftModel.from_pretrained` and reproduces our logprobs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig  # imported with the trainer: a first import at a run's first autosave stalled training ~1 s
from torch import nn
from transformers.pytorch_utils import Conv1D

from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer.lora import targets_among

PEFT_PREFIX = "base_model.model."
ALL_TARGETS = LoraSpec(train_mlp=True, train_attn=True, train_unembed=True)


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One adapter: per adapted layer path, A `(r, in)` and B `(out, r)`; `scale` is alpha / r.
    A run's live adapter holds leaf tensors that require grad; a snapshot holds detached copies."""

    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float

    def parameters(self) -> list[torch.Tensor]:
        """A, B of every layer in the adapter's own (model) order: the same on every rank."""
        return [t for pair in self.layers.values() for t in pair]

    def snapshot(self) -> LoraWeights:
        return LoraWeights({p: (a.detach().clone(), b.detach().clone()) for p, (a, b) in self.layers.items()},
                           self.scale)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())


@dataclass(frozen=True, slots=True)
class RowGroup:
    """Rows `[start, end)` of the current batch go through `weights` (None: the base model alone)."""

    start: int
    end: int
    weights: LoraWeights | None


class Routing:
    """Which rows of the forward now running go through which adapter. One per model, shared by all
    of its routed layers; set only around a forward, on the one thread that runs the model."""

    def __init__(self) -> None:
        self.groups: tuple[RowGroup, ...] = ()

    @contextlib.contextmanager
    def route(self, groups: Sequence[RowGroup]) -> Iterator[None]:
        previous, self.groups = self.groups, tuple(groups)
        try:
            yield
        finally:
            self.groups = previous


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):  # GPT-2's Linear stores weight as (in, out)
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return int(layer.in_features), int(layer.out_features)  # type: ignore[arg-type]


class RoutedLinear(nn.Module):
    """A frozen base linear layer plus, per row group, that group's LoRA delta."""

    def __init__(self, base: nn.Module, path: str, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.routing = routing
        self.in_features, self.out_features = _features(base)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects `lm_head.weight` (dtype, tying checks)
        return self.base.weight  # type: ignore[return-value]

    def _delta(self, x: torch.Tensor, weights: LoraWeights) -> torch.Tensor | None:
        pair = weights.layers.get(self.path)
        if pair is None:
            return None
        a, b = pair
        if x.dtype != a.dtype:  # a same-dtype `.to` is still a dispatch: on small ops these add up
            x = x.to(a.dtype)
        return F.linear(F.linear(x, a), b) * weights.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        groups = self.routing.groups
        if not groups:
            return out
        rows = x.shape[0]
        if len(groups) == 1 and groups[0].start == 0 and groups[0].end == rows:  # one run: peft's exact sum
            only = groups[0].weights
            delta = None if only is None else self._delta(x, only)
            if delta is None:
                return out
            return out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))
        pieces: list[torch.Tensor] = []
        done, adapted = 0, False
        for group in groups:
            delta = None if group.weights is None else self._delta(x[group.start:group.end], group.weights)
            if delta is None:
                continue
            if group.start > done:
                pieces.append(out.new_zeros((group.start - done, *out.shape[1:])))
            pieces.append(delta.to(out.dtype))
            done, adapted = group.end, True
        if not adapted:
            return out
        if done < rows:
            pieces.append(out.new_zeros((rows - done, *out.shape[1:])))
        return out + torch.cat(pieces, dim=0)


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class AdapterSites:
    """The base model's adaptable layers, wrapped once (`install`): what any adapter can attach to."""

    def __init__(self, linear_names: list[str], layers: dict[str, RoutedLinear], routing: Routing) -> None:
        self.linear_names = linear_names  # every linear layer path of the unwrapped model, in model order
        self.layers = layers
        self.routing = routing

    @classmethod
    def install(cls, model: nn.Module) -> AdapterSites:
        """Wrap every linear layer any LoRA spec could adapt; the model computes exactly as before until
        a routing is set."""
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
        routing = Routing()
        layers: dict[str, RoutedLinear] = {}
        for path in _select(names, ALL_TARGETS):
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layers[path] = RoutedLinear(parent.get_submodule(child), path, routing)
            setattr(parent, child, layers[path])
        return cls(names, layers, routing)

    def checkpoint_name(self, param_name: str) -> str:
        """The base checkpoint's key for a parameter of the wrapped model (`q_proj.base.weight` → `q_proj.weight`)."""
        owner, _, leaf = param_name.rpartition(".")
        layer = owner.removesuffix(".base")
        return f"{layer}.{leaf}" if owner.endswith(".base") and layer in self.layers else param_name

    def target_modules(self, spec: LoraSpec) -> list[str]:
        """peft's `target_modules` for `spec` (ValueError when it selects nothing)."""
        return targets_among(self.linear_names, spec)

    def paths(self, spec: LoraSpec) -> list[str]:
        return _select(self.linear_names, spec)

    def new_adapter(self, spec: LoraSpec, *, seed: int, device: torch.device) -> LoraWeights:
        """A fresh adapter for `spec`, initialised as peft initialises one: per layer in model order,
        the two `nn.Linear` inits (A, then B), then `kaiming_uniform_(A)` again and B = 0, all drawn
        from a private generator seeded with `seed` (the global RNG is untouched; ranks draw alike)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path in self.paths(spec):
            layer = self.layers[path]
            a = _kaiming(torch.empty(spec.rank, layer.in_features), gen)
            _kaiming(torch.empty(layer.out_features, spec.rank), gen)  # peft's B Linear init, then zeroed
            _kaiming(a, gen)
            b = torch.zeros(layer.out_features, spec.rank)
            out[path] = (a.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
        return LoraWeights(out, spec.alpha / spec.rank)

    def peft_config(self, spec: LoraSpec, base_model_name: str) -> dict[str, Any]:
        """adapter_config.json as peft writes it for this adapter (loads in `PeftModel.from_pretrained`)."""
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                            target_modules=self.target_modules(spec), task_type="CAUSAL_LM",
                            base_model_name_or_path=base_model_name)
        return config.to_dict()


def _select(linear_names: list[str], spec: LoraSpec) -> list[str]:
    targets = targets_among(linear_names, spec)
    return [name for name in linear_names if _matches(name, targets)]


def _kaiming(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`nn.init.kaiming_uniform_(t, a=sqrt(5))` drawing from `gen`."""
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5.0))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=gen)


def peft_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """peft's checkpoint keys (`get_peft_model_state_dict` of a one-adapter PeftModel), on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in weights.layers.items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
    return out


def fit_problem(weights: LoraWeights, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why `tensors` (peft keys) cannot be loaded into `weights`, or None when they fit exactly."""
    expected = peft_state_dict_shapes(weights)
    if set(tensors) != set(expected):
        return f"keys differ: {sorted(set(tensors) ^ set(expected))[:3]}"
    bad = [k for k in tensors if tuple(tensors[k].shape) != tuple(expected[k])]
    return f"shapes differ for {bad[:3]}" if bad else None


def peft_state_dict_shapes(weights: LoraWeights) -> dict[str, torch.Size]:
    out: dict[str, torch.Size] = {}
    for path, (a, b) in weights.layers.items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.shape
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.shape
    return out


def load_peft_state_dict(weights: LoraWeights, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy peft-keyed tensors into `weights` in place (check `fit_problem` first)."""
    with torch.no_grad():
        for path, (a, b) in weights.layers.items():
            a.copy_(tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"])
            b.copy_(tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"])
