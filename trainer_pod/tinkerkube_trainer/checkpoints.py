"""Checkpoints on disk: PEFT format + optimizer + metadata.

Why PEFT's own layout: a user who downloads a sampler checkpoint must be able to run
`PeftModel.from_pretrained(base, dir)` with nothing of ours installed. Our extras sit beside it:
`optimizer.pt` (save_state only) and `tinkerkube.json` (seq_id, base model, LoRA spec), which is how
a restarted trainer knows where it left off. Every checkpoint is written into a temporary sibling
directory and renamed into place, so a crash never leaves a half-written checkpoint under its name.

Writers pass tensors (peft key names, `multilora.peft_state_dict`) and the adapter_config dict; no
peft model is involved, so one pool's many runs each write their own adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from tinkerkube_contract.paths import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METADATA_FILE, OPTIMIZER_FILE
from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_trainer.engine_api import Collective, OpError

T = TypeVar("T")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_atomically(directory: Path, fill: Callable[[Path], None]) -> None:
    """`fill` a temporary sibling directory, then rename it into place, replacing an older one of that
    name: a crash never leaves a half-written directory under the name."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.rename(directory, old / "replaced")
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(
    directory: Path,
    adapter: Mapping[str, torch.Tensor],
    adapter_config: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
) -> int:
    """Write adapter (peft keys) + adapter_config.json (+ optimizer) + metadata atomically; replaces an
    older checkpoint of that name. Returns the checkpoint's size in bytes."""
    def fill(tmp: Path) -> None:
        save_file(dict(adapter), str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_FILE).write_text(adapter_config_text(adapter_config))
        if optimizer_state is not None:
            torch.save(dict(optimizer_state), tmp / OPTIMIZER_FILE)
        meta = {**metadata, "has_optimizer": optimizer_state is not None, "created_at": time.time()}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    write_atomically(directory, fill)
    return _dir_size(directory)


def adapter_config_text(adapter_config: Mapping[str, Any]) -> str:
    """adapter_config.json's text, as peft's own save_pretrained writes it."""
    return json.dumps(dict(adapter_config), indent=2, sort_keys=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """peft configs hold sets and enums; write them as peft's own save_pretrained does."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def read_metadata(directory: Path) -> dict[str, Any]:
    meta_file = directory / METADATA_FILE
    if not (directory / ADAPTER_WEIGHTS_FILE).is_file() or not (directory / ADAPTER_CONFIG_FILE).is_file():
        raise OpError(f"no checkpoint at {directory.name!r}: it was never saved or has been deleted",
                      code="checkpoint_not_found")
    if not meta_file.is_file():
        return {}
    return json.loads(meta_file.read_text())


def read_adapter(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter tensors (PEFT key names, on the CPU)."""
    return load_file(str(directory / ADAPTER_WEIGHTS_FILE), device="cpu")


def load_optimizer_state(directory: Path) -> dict[str, Any]:
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise OpError(f"checkpoint {directory.name!r} holds no optimizer state (sampler weights?): "
                      "load it without the optimizer", code="no_optimizer_state")
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass(frozen=True, slots=True)
class Restored:
    meta: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None


def from_rank0(collective: Collective, read: Callable[[], T]) -> T:
    """Run `read` on rank 0 alone and hand its result to every rank. Other ranks may not see rank 0's
    checkpoint store (a per-node hostPath), and a failure must fail every rank alike, never some."""
    outcome: tuple[bool, Any] = (True, None)
    if collective.rank == 0:
        try:
            outcome = (True, read())
        except OpError as exc:
            outcome = (False, (exc.message, exc.code, exc.category))
        except Exception as exc:  # e.g. a corrupt file: still fail on every rank, not only here
            outcome = (False, (f"cannot read the checkpoint: {type(exc).__name__}: {exc}", "checkpoint_unreadable",
                               ErrorCategory.SERVER))
    if collective.world_size > 1:
        outcome = collective.all_gather_object(outcome)[0]
    ok, value = outcome
    if not ok:
        raise OpError(value[0], code=value[1], category=value[2])
    return value


def read_restore(directory: Path, with_optimizer: bool) -> Restored:
    meta = read_metadata(directory)
    optimizer_state = load_optimizer_state(directory) if with_optimizer else None
    return Restored(meta, read_adapter(directory), optimizer_state)
