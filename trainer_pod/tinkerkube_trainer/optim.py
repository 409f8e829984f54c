"""AdamW over the LoRA parameters, with each step's hyper-parameters taken from its request.

Why one long-lived torch AdamW whose param groups are rewritten per step: Tinker lets every
optim_step carry its own AdamParams (learning-rate schedules live on the client), while the moment
estimates must persist across steps and across save/load. Gradients are applied as accumulated
(summed) since the last step, then cleared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tinkerkube_contract.pod_api import AdamParams


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No element of `tensors` is NaN or ±inf: a gradient that is refuses its op or its step.

    One multi-tensor max-|x| norm instead of an isfinite + all per tensor: the norm is NaN or inf exactly
    when some element is (NaN propagates through max; no sum that could overflow)."""
    present = [t for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined
    if not present:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(present, float("inf")))).all())


class LoraOptimizer:
    def __init__(self, params: Sequence[nn.Parameter]):
        self.params = list(params)
        self.num_params = sum(p.numel() for p in self.params)
        self.steps = 0
        # foreach: one multi-tensor update instead of a Python loop over A and B of every layer (on CPU torch
        # would pick the loop: half the step's time on small adapters, measured); the same arithmetic.
        self.torch_opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                           foreach=True)

    def _apply_hparams(self, hp: AdamParams) -> None:
        for group in self.torch_opt.param_groups:
            group["lr"] = hp.learning_rate
            group["betas"] = (hp.beta1, hp.beta2)
            group["eps"] = hp.eps
            group["weight_decay"] = hp.weight_decay  # decoupled: AdamW multiplies p by (1 - lr·wd)
            group["foreach"] = True  # also after loading a state saved before this was set

    def step(self, hp: AdamParams) -> dict[str, float]:
        """Clip (if asked), step, zero the grads; one host sync for the metrics, once per step."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            # multi-tensor, as torch's own clip_grad_norm_: one kernel for all on CUDA (CPU loops either way)
            floats = grads if all(g.dtype == torch.float32 for g in grads) else [g.float() for g in grads]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(floats)))
            if hp.grad_clip_norm > 0:
                scale = torch.clamp(hp.grad_clip_norm / (norm + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(scale.to(g.dtype))
            grad_norm = float(norm)
        else:
            grad_norm = 0.0
        self._apply_hparams(hp)
        self.torch_opt.step()
        self.torch_opt.zero_grad(set_to_none=True)
        self.steps += 1
        return {
            "grad_norm": grad_norm,
            "learning_rate": hp.learning_rate,
            "num_params": float(self.num_params),
            "step": float(self.steps),
        }

    def zero_grad(self) -> None:
        self.torch_opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": self.torch_opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_opt.load_state_dict(state["torch"])
        self.steps = int(state.get("steps", 0))
