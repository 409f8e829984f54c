"""Automatic durable checkpoints of runs, so that a run brought back after its pool died replays a short tail.

Why: when a pool process dies, each of its runs is attached again (`RunSpec.resume`) from its newest
durable checkpoint and the gateway replays the ops after it from its op log. Without automatic
checkpoints that tail is the whole run. Every `every_steps` optim_steps (or `every_seconds`, at the
next optim_step), rank 0 copies the run's adapter and AdamW state (cheap: a LoRA adapter) and a
background thread writes them as `tinker://<run>/weights/auto-<seq>` (atomically, like every
checkpoint) and deletes the run's older automatic ones beyond `keep`. The op thread never waits for
the disk. Users never see these: the gateway registers only checkpoints it was asked for.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinkerkube_contract.paths import METADATA_FILE, CheckpointKind, TinkerPath
from tinkerkube_trainer import checkpoints

log = logging.getLogger(__name__)
PREFIX = "auto-"


@dataclass(frozen=True, slots=True)
class Durable:
    path: str  # tinker:// path
    seq_id: int


def _run_dir(checkpoint_dir: Path, model_id: str) -> Path:
    return TinkerPath(model_id, CheckpointKind.WEIGHTS, "x").directory(checkpoint_dir).parent


def _meta(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / METADATA_FILE).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def latest_durable(checkpoint_dir: Path, model_id: str) -> Durable | None:
    """This run's newest checkpoint that it wrote itself with its optimizer state (a save_state or an
    automatic one): the state to resume from, and the seq_id it contains."""
    best: Durable | None = None
    run_dir = _run_dir(checkpoint_dir, model_id)
    if not run_dir.is_dir():
        return None
    for child in run_dir.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        meta = _meta(child)
        seq = meta.get("seq_id")
        if meta.get("model_id") != model_id or not meta.get("has_optimizer") or not isinstance(seq, int):
            continue
        if best is None or seq > best.seq_id:
            best = Durable(str(TinkerPath(model_id, CheckpointKind.WEIGHTS, child.name)), seq)
    return best


class AutoSaver:
    def __init__(self, checkpoint_dir: Path, *, every_steps: int, every_seconds: float, keep: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.every_steps, self.every_seconds, self.keep = every_steps, every_seconds, max(1, keep)
        self._clock = clock
        self._since: dict[str, tuple[int, float]] = {}  # model_id → (optim_steps since the last save, its time)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tinkerkube-autosave")
        self._pending: list[Future[None]] = []

    def stepped(self, model_id: str) -> bool:
        """Record an optim_step of `model_id`; True when an automatic checkpoint is due now."""
        if self.every_steps <= 0:
            return False
        steps, since = self._since.get(model_id, (0, self._clock()))
        steps += 1
        if steps >= self.every_steps or self._clock() - since >= self.every_seconds:
            self._since[model_id] = (0, self._clock())
            return True
        self._since[model_id] = (steps, since)
        return False

    def forget(self, model_id: str) -> None:
        self._since.pop(model_id, None)

    def save(self, model_id: str, seq_id: int, adapter: dict[str, Any], adapter_config: dict[str, Any],
             metadata: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """On the op thread: take copies, hand the write to the background writer."""
        state = copy.deepcopy(optimizer_state)  # the live moments keep changing under the writer
        path = TinkerPath(model_id, CheckpointKind.WEIGHTS, f"{PREFIX}{seq_id:012d}")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._writer.submit(self._write, path, adapter, adapter_config, metadata, state))

    def _write(self, path: TinkerPath, adapter: dict[str, Any], adapter_config: dict[str, Any],
               metadata: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        try:
            checkpoints.write_checkpoint(path.directory(self.checkpoint_dir), adapter, adapter_config,
                                         metadata=metadata, optimizer_state=optimizer_state)
            self._prune(path.run_id)
        except Exception:  # a full disk must not take the pool down; the previous one still stands
            log.exception("automatic checkpoint failed", extra={"path": str(path)})

    def _prune(self, model_id: str) -> None:
        autos = sorted(d for d in _run_dir(self.checkpoint_dir, model_id).iterdir()
                       if d.is_dir() and d.name.startswith(PREFIX))
        for old in autos[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the writes handed over so far (tests; a clean stop)."""
        for future in list(self._pending):
            future.result(timeout)
