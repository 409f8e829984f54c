"""External weights: a run's adapter as the files a user downloads (`save_weights_external`).

Why a format of its own next to `checkpoints.py`: an external checkpoint is what leaves the service, so it
holds PEFT's own two files and nothing of ours (no optimizer, no `tinkerkube.json`), which load with
`PeftModel.from_pretrained(base, dir)` and which the cookbook's `weights.build_lora_adapter` /
`build_hf_model` read. With age recipients (the cookbook's `weights.download` generates a key per
download) every file is encrypted to them before it is written and named `<file>.age`, so the
plaintext never sits in the checkpoint store. Written into a temporary sibling and renamed into
place, like every checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
import safetensors.torch
import torch

from tinkerkube_contract.paths import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CheckpointKind,
    InvalidTinkerPath,
    TinkerPath,
    validate_name,
)
from tinkerkube_contract.pod_api import MAX_AGE_RECIPIENTS, CheckpointWritten, ErrorCategory, SaveExternalWeightsOp
from tinkerkube_trainer import checkpoints
from tinkerkube_trainer.engine_api import Collective, OpError

AGE_SUFFIX = ".age"
_MAX_RECIPIENT_CHARS = 16 * 1024  # an SSH RSA-16384 public key is ~2.8 KiB; anything longer is not a key


def parse_recipients(recipients: Sequence[str]) -> list[Any]:
    """pyrage recipients for `age1...` keys and SSH public keys; OpError (the user's) for anything else.
    Not picklable: a prepared op keeps the strings, rank 0 parses them again when it writes."""
    if len(recipients) > MAX_AGE_RECIPIENTS:
        raise OpError(f"at most {MAX_AGE_RECIPIENTS} age recipients, got {len(recipients)}", code="invalid_recipient")
    parsed = []
    for text in recipients:
        key = text.strip() if isinstance(text, str) else ""
        if not key or len(key) > _MAX_RECIPIENT_CHARS:
            raise OpError("an age recipient must be a non-empty 'age1...' key or an SSH public key",
                          code="invalid_recipient")
        try:
            parsed.append(pyrage.x25519.Recipient.from_str(key) if key.startswith("age1")
                          else pyrage.ssh.Recipient.from_str(key))
        except (pyrage.RecipientError, ValueError) as exc:
            raise OpError(f"invalid age recipient {key[:40]!r}: {exc}", code="invalid_recipient") from None
    return parsed


@dataclass(frozen=True, slots=True)
class ExportPayload:
    path: TinkerPath
    age_recipients: tuple[str, ...]  # checked by `parse_recipients` at prepare; strings stay picklable


def decode(model_id: str, op: SaveExternalWeightsOp) -> ExportPayload:
    """Prepare (rank 0, no state touched): the export's path and recipients, or the user's OpError."""
    parse_recipients(op.age_recipients)
    try:
        path = TinkerPath(model_id, CheckpointKind.EXTERNAL_WEIGHTS, validate_name(op.name))
    except InvalidTinkerPath as exc:
        raise OpError(str(exc), code="invalid_path") from None
    return ExportPayload(path, tuple(op.age_recipients))


Adapter = Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None]  # tensors, adapter_config


def save(collective: Collective, p: ExportPayload, adapter: Adapter, checkpoint_dir: Path) -> CheckpointWritten:
    """Rank 0 writes the export (`adapter()`: the run's tensors and config, None for a base-model run);
    every rank learns the outcome, so a full or read-only store fails the op on every rank alike."""
    def write() -> int:
        made = adapter()
        if made is None:
            return 0
        directory = p.path.directory(checkpoint_dir)
        try:
            return write_external(directory, external_files(*made), parse_recipients(p.age_recipients))
        except OSError as exc:
            free = shutil.disk_usage(checkpoint_dir).free if checkpoint_dir.exists() else 0
            raise OpError(f"could not write {p.path}: {exc.strerror or exc} ({free} bytes free in the checkpoint "
                          "store: is it full or read-only?)", code="checkpoint_write_failed",
                          category=ErrorCategory.SERVER) from None

    size = checkpoints.from_rank0(collective, write)
    return CheckpointWritten(tinker_path=str(p.path), kind="external_weights", size_bytes=size)


def external_files(adapter: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> dict[str, bytes]:
    """File name → content of an unencrypted export (PEFT's layout)."""
    return {ADAPTER_WEIGHTS_FILE: safetensors.torch.save(dict(adapter), metadata={"format": "pt"}),
            ADAPTER_CONFIG_FILE: checkpoints.adapter_config_text(adapter_config).encode()}


def write_external(directory: Path, files: Mapping[str, bytes], recipients: Sequence[Any]) -> int:
    """Write `files` (encrypted to `recipients` when there are any) atomically, replacing an older export
    of that name. Returns the export's size in bytes (what is stored and downloaded)."""
    def fill(tmp: Path) -> None:
        for name, content in files.items():
            if recipients:
                (tmp / (name + AGE_SUFFIX)).write_bytes(pyrage.encrypt(content, list(recipients)))
            else:
                (tmp / name).write_bytes(content)

    checkpoints.write_atomically(directory, fill)
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())

