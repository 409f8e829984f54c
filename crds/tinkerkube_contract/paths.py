"""tinker:// paths and where they live in the checkpoint store.

Both the trainer (writes checkpoints) and the gateway (registry, resolving paths for samplers and
restores) need the same answer; a path trick here (`..`, `/`, NUL) would let one tenant read
another's files, so every component parses through this one function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SCHEME = "tinker://"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class CheckpointKind(StrEnum):
    WEIGHTS = "weights"  # save_state: adapter + optimizer
    SAMPLER_WEIGHTS = "sampler_weights"  # save_weights_for_sampler: adapter only
    EXTERNAL_WEIGHTS = "external_weights"


class InvalidTinkerPath(ValueError):
    """A user error: the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class TinkerPath:
    run_id: str
    kind: CheckpointKind
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """What the REST API calls a checkpoint: the path after the run id (contains a '/')."""
        return f"{self.kind}/{self.name}"

    def directory(self, root: Path | str) -> Path:
        return Path(root) / self.run_id / self.kind.value / self.name


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidTinkerPath(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-' and without '..'"
        )
    return name


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise InvalidTinkerPath(f"invalid training run id {run_id!r}")
    return run_id


def parse_tinker_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise InvalidTinkerPath(f"not a tinker:// path: {path!r}")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3:
        raise InvalidTinkerPath(f"a tinker path is tinker://<run_id>/<kind>/<name>, got {path!r}")
    run_id, kind, name = parts
    try:
        checkpoint_kind = CheckpointKind(kind)
    except ValueError:
        raise InvalidTinkerPath(
            f"unknown checkpoint kind {kind!r} in {path!r}: expected one of "
            + ", ".join(k.value for k in CheckpointKind)
        ) from None
    return TinkerPath(validate_run_id(run_id), checkpoint_kind, validate_name(name))


def parse_checkpoint_id(run_id: str, checkpoint_id: str) -> TinkerPath:
    """REST routes carry `<kind>/<name>` after the run id; same rules as a full path."""
    return parse_tinker_path(f"{SCHEME}{run_id}/{checkpoint_id}")


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """The SDK derives this itself in create_training_client_from_state: the format is fixed."""
    return f"{session_id}:train:{model_seq_id}"


def sampler_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


# Files inside a checkpoint directory. PEFT's own names, so `PeftModel.from_pretrained(dir)` works.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
METADATA_FILE = "tinkerkube.json"  # base_model, lora spec, seq_id, created_at
