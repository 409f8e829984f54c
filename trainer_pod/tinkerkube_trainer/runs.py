"""One run attached to a pool: its adapter, optimizer, gradient accumulator and sampler snapshots.

Why per-run state and nothing shared: a pool's runs share only the frozen base model, so a run is
exactly the bytes that make it different from the base (its adapter, AdamW moments and summed
gradients, plus the snapshots it asked for). Attaching a run costs that and no more; detaching frees
it; one run's failure can only ever touch its own fields.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from tinkerkube_contract.pod_api import RunSpec
from tinkerkube_contract.resource import SessionMode
from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.multilora import LoraWeights
from tinkerkube_trainer.optim import LoraOptimizer, all_finite

LIVE = None  # a snapshot entry meaning "the run's weights now" (a restored checkpoint's path)


@dataclass
class Run:
    spec: RunSpec
    weights: LoraWeights | None  # None: a sampler of the base model alone
    optimizer: LoraOptimizer | None  # None: a sample-mode run
    max_snapshots: int = 8
    acc: list[torch.Tensor] | None = None  # gradients summed since the last optim_step
    snapshots: OrderedDict[str, LoraWeights | None] = field(default_factory=OrderedDict)
    restored_from: str | None = None
    last_completed_seq_id: int = 0

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def training(self) -> bool:
        return self.spec.mode is SessionMode.TRAIN

    def params(self) -> list[torch.Tensor]:
        return [] if self.weights is None else self.weights.parameters()

    def accumulate(self, grads: list[torch.Tensor]) -> None:
        if self.acc is None:
            self.acc = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
        for acc, g in zip(self.acc, grads, strict=True):
            acc.add_(g)

    def step(self, adam_params: Any) -> dict[str, float]:
        """Apply the summed gradients with this step's hyper-parameters; refuses non-finite gradients
        (the user's data made them) leaving weights, moments and the accumulator as they were."""
        if self.optimizer is None:
            raise OpError("this run only samples; optim_step needs a training run", code="sample_only")
        if self.acc is not None and not all_finite(self.acc):
            raise OpError("the accumulated gradients are not finite; this step was not applied",
                          code="non_finite_gradients")
        for param, acc in zip(self.params(), self.acc or [None] * len(self.params()), strict=True):
            param.grad = None if acc is None else acc.to(param.dtype)
        self.acc = None
        return self.optimizer.step(adam_params)

    def remember(self, snapshot_id: str) -> None:
        """Keep the weights as of now under `snapshot_id` (rank 0 only: only rank 0 samples)."""
        self.snapshots[snapshot_id] = None if self.weights is None else self.weights.snapshot()
        self.snapshots.move_to_end(snapshot_id)
        while len(self.snapshots) > self.max_snapshots:
            self.snapshots.popitem(last=False)

    def weights_for(self, snapshot_id: str | None) -> LoraWeights | None:
        if snapshot_id is None:
            return self.weights
        if snapshot_id not in self.snapshots:
            raise OpError(f"sampler snapshot {snapshot_id!r} is no longer held", code="unknown_snapshot")
        held = self.snapshots[snapshot_id]
        return self.weights if held is LIVE else held

    def num_bytes(self) -> int:
        """What this run holds beyond the base model (adapter, optimizer moments, accumulator, snapshots)."""
        def size(tensors: Any) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

        total = self.weights.num_bytes() if self.weights is not None else 0
        total += size(self.acc or [])
        if self.optimizer is not None:
            total += sum(size(state.values()) for state in self.optimizer.torch_opt.state.values())
        total += sum(s.num_bytes() for s in self.snapshots.values() if s is not None)
        return total
