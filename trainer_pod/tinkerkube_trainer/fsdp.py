"""A pool's frozen base model sharded over its ranks with FSDP2 (`sharding: fsdp`).

Why: with `replicate` every rank holds the whole base, so a base larger than one device cannot be
trained at all. Here each decoder layer (and the root: embeddings, final norm, lm_head) is
`fully_shard`ed over the pool's ranks, so each rank holds ~1/N of the base's parameters and
all-gathers one layer at a time while it computes.

Why nothing else changes: LoRA adapters are not module parameters (`multilora.LoraWeights` are plain
tensors the routed layers read), so FSDP never sees them. They stay replicated: every rank computes
its shard of each op's rows, LoRA gradients are all-reduce-SUMmed exactly as under `replicate`
(`train_pass.run`), and every rank applies the same optimizer step. The base needs no gradient, so
FSDP reduces nothing; its only cost is the all-gathers, and that every forward must now run on every
rank in lockstep (sampling too: `engine.PoolEngine.run_samples`).

Loading: the model is built with its parameters on the meta device (buffers such as rotary
frequencies are computed for real), sharded, and each rank then reads only its own rows of each
tensor from the safetensors files, so no rank ever holds the whole base. The shards are dim-0 chunks
(`torch.chunk` rule: ceil(rows / N) per rank, the last ones shorter or empty), FSDP2's layout.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinkerkube_trainer import hf_loading

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the first ModuleList of the model (HF causal LMs keep
    their decoder layers in exactly one, `model.layers` or `transformer.h`)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__} has no decoder layer list to shard")


def mesh_for(device: torch.device, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def mixed_precision(dtype: torch.dtype) -> Any:
    """bf16 pools compute in bf16 and would reduce in fp32 (nothing of the base is reduced today: it is
    frozen); fp32 pools need no policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, *, device: torch.device, world_size: int, dtype: torch.dtype) -> None:
    """fully_shard every decoder layer, then the root (what is left: embeddings, norm, lm_head).
    Tinker sums gradients: were any base parameter trainable, FSDP must not average them, and gloo
    has no pre-multiplied sum, hence the two settings."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = mesh_for(device, world_size)
    policy = mixed_precision(dtype)
    modules = [*decoder_layers(model), model]
    for module in modules:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for module in modules:
        assert isinstance(module, FSDPModule)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Module construction puts every parameter on the meta device (no memory) while buffers, computed
    from the config (rotary frequencies), stay real. Each parameter is created on the CPU first, one at a
    time, then moved: the peak is one tensor, never the model."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(location: str, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `location` with its parameters on the meta device and its weights tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location, local_files_only=True)
    with hf_loading.serialized(), _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out is not None and out.weight is not inp.weight:
        raise hf_loading.UntiedModel(f"building {location} on the meta device left lm_head untied")
    return model


def grads_through_every_layer(model: nn.Module) -> None:
    """Make the input embeddings' output require grad in grad mode: every decoder layer's output then
    requires grad, so FSDP's pre-backward all-gather of every layer runs on every rank in every backward,
    whichever layers the adapters of this rank's rows touch (ranks must issue the same collectives).
    The forward is unchanged; the extra gradient (down to the embeddings' output) is discarded."""

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return output

    model.get_input_embeddings().register_forward_hook(hook)


def _tensor_files(location: str) -> dict[str, Path]:
    """Checkpoint key → the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    root = Path(location)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {key: root / name for key, name in weight_map.items()}
    single = root / SAFETENSORS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{location} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}: sharded loading "
                                "reads safetensors only")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def chunk_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 that `rank` holds (torch.chunk's rule, FSDP2's layout)."""
    per = -(-rows // world_size)
    start = min(rows, rank * per)
    return start, min(rows, start + per)


def load_shards(model: nn.Module, location: str, *, device: torch.device, rank: int, world_size: int,
                checkpoint_name: Callable[[str], str]) -> None:
    """Materialise the sharded (meta) parameters on `device` and fill each rank's rows from the
    safetensors files, reading only those rows. `checkpoint_name` maps a parameter's name in the
    (wrapped) model to its key in the checkpoint."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)  # parameters: each rank's shard, uninitialised; buffers: refilled below
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    files = _tensor_files(location)
    prefixes = ("", "model.")
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                key = checkpoint_name(name)
                found = next((p + key for p in prefixes if p + key in files), None)
                if found is None:
                    stripped = key.removeprefix("model.")
                    found = stripped if stripped in files else None
                if found is None:
                    raise KeyError(f"{location}: no tensor {key!r} in the checkpoint")
                path = files[found]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt").__enter__()
                piece = handles[path].get_slice(found)
                local = param.to_local() if isinstance(param, DTensor) else param
                if isinstance(param, DTensor):
                    start, end = chunk_bounds(param.shape[0], rank, world_size)
                    rows = piece[start:end]
                else:
                    rows = piece[:]
                if tuple(rows.shape) != tuple(local.shape):
                    raise ValueError(f"{found}: shard shape {tuple(rows.shape)} != local {tuple(local.shape)}")
                local.copy_(rows.to(local.dtype))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of base parameters this rank holds (its shards under fsdp, everything under replicate)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total
