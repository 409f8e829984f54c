"""Resolve a base-model name to a directory and load it for training or sampling.

Why fp32 on CPU and bf16 on CUDA: CPU kernels for bf16 are slow and lose precision the invariance
tests rely on; on GPUs bf16 halves memory at no cost in speed. No hub is reachable from trainer pods,
so a hub id only works if it is already in the local HF cache; otherwise the error says how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub.constants
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tinkerkube_contract.models import SourceKind, resolve_model
from tinkerkube_trainer import fsdp, hf_loading, model_store
from tinkerkube_trainer.engine_api import OpError


@dataclass(slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_dir: str  # a local dir or hub id: what the tokenizer is loaded from
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_location(name: str, *, aliases: dict[str, str] | None, cache_dir: Path) -> str:
    """A local directory for built-ins and local paths (building built-ins on first use), else the hub id."""
    source = resolve_model(name, aliases=aliases, cache_dir=cache_dir)
    if source.kind is SourceKind.BUILTIN:
        return str(model_store.prepare((aliases or {}).get(name, name), cache_dir))
    return source.location


def _from_pretrained(location: str, dtype: torch.dtype, *, local_only: bool):
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = hf_loading.load_causal_lm(location, dtype=dtype, local_files_only=local_only)
    return tokenizer, model


def _hub_error(name: str, exc: Exception) -> OpError:
    return OpError(
        f"cannot load base model {name!r}: it is neither a built-in ({', '.join(model_store.BUILTIN_MODELS)}) "
        f"nor a local directory, it is not in the local HF cache, and no model hub is reachable from the trainer "
        f"({exc.__class__.__name__}). Put the model in a directory visible to the trainer and pass that path "
        "(or an alias of it) as base_model.",
        code="model_unavailable",
    )


def load_base_model(
    name: str, *, aliases: dict[str, str] | None = None, cache_dir: Path, device: str = "auto"
) -> LoadedModel:
    """Load the tokenizer and the causal LM in eval mode (no dropout: training must be deterministic)."""
    dev = resolve_device(device)
    location = model_location(name, aliases=aliases, cache_dir=cache_dir)
    try:
        tokenizer, model = _from_pretrained(location, dtype_for(dev), local_only=True)
    except OSError as exc:
        if Path(location).is_dir():
            raise
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise _hub_error(name, exc) from None
        try:  # not in the local HF cache: a hub may still be reachable in this deployment
            tokenizer, model = _from_pretrained(location, dtype_for(dev), local_only=False)
        except OSError as exc2:
            raise _hub_error(name, exc2) from None
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, model_dir=location, device=dev)


Sites = TypeVar("Sites")


def _local_dir(name: str, location: str) -> str:
    """Sharded loading reads safetensors files: a local directory, or a hub id already in the HF cache."""
    if Path(location).is_dir():
        return location
    try:
        return str(huggingface_hub.snapshot_download(location, local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError and friends)
        raise _hub_error(name, exc) from None


def load_sharded_base_model(
    name: str, *, aliases: dict[str, str] | None = None, cache_dir: Path, device: str = "auto", rank: int,
    world_size: int, install: Callable[[torch.nn.Module], Sites], checkpoint_name: Callable[[Sites, str], str],
) -> tuple[LoadedModel, Sites]:
    """`sharding: fsdp`: build the model with its parameters on the meta device, let `install` wrap its
    layers (adapter sites) while nothing is allocated, shard it over the ranks (fsdp.shard), then read
    only this rank's rows of each tensor. No rank ever holds the whole base."""
    dev = resolve_device(device)
    location = _local_dir(name, model_location(name, aliases=aliases, cache_dir=cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
    model = fsdp.build_on_meta(location, dtype_for(dev))
    model.eval()
    model.requires_grad_(False)
    sites = install(model)
    fsdp.shard(model, device=dev, world_size=world_size, dtype=dtype_for(dev))
    fsdp.load_shards(model, location, device=dev, rank=rank, world_size=world_size,
                     checkpoint_name=lambda param: checkpoint_name(sites, param))
    fsdp.grads_through_every_layer(model)
    return LoadedModel(model=model, tokenizer=tokenizer, model_dir=location, device=dev), sites


def eos_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    """Every token that ends a sample: the tokenizer's EOS and the model's generation-config EOS list."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, list) else ({gen_eos} if gen_eos is not None else set())
    return {int(i) for i in ids}
