"""The model side of a batched decode: inputs, the left-padding mask, positions and the KV cache of the
rows being decoded; rows can be selected (repeated, dropped) and another batch joined at a step
boundary (continuous batching: both caches left-padded to one length, the padding masked out)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from tinkerkube_trainer import vision
from tinkerkube_trainer.multilora import Routing, RowGroup
from tinkerkube_trainer.vision import ImageBatch


class DecodeBatch:
    """The model side of a decode: inputs, padding mask, positions and the KV cache of the live rows."""

    def __init__(self, model: torch.nn.Module, routing: Routing | None, device: torch.device) -> None:
        self.model, self.routing, self.device = model, routing, device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (rows, seen) once any prompt needed left padding
        self.positions: torch.Tensor | None = None  # (rows, 1): each row's last position, with `mask`

    def forward(self, input_ids: torch.Tensor, groups: list[RowGroup], **extra: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {"use_cache": True}
        if self.cache is not None:
            kwargs["past_key_values"] = self.cache
        if self.mask is not None:
            kwargs["attention_mask"], kwargs["position_ids"] = self.mask, self.positions
        kwargs.update(extra)
        route = self.routing.route(groups) if self.routing is not None else contextlib.nullcontext()
        with route:
            out = self.model(input_ids=input_ids, **kwargs)
        self.cache = out.past_key_values
        return out.logits

    def prefill(self, prompts: Sequence[Sequence[int]], groups: list[RowGroup],
                images: Sequence[ImageBatch | None] = ()) -> torch.Tensor:
        """Left-pads the prompts (position ids count real tokens only); returns `(rows, width, V)` logits.
        A multimodal model (`vision.is_multimodal`) gets each prompt's images and 3-axis positions, and its
        mask and positions are kept explicit from then on."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        if vision.is_multimodal(self.model):
            self.mask = mask.to(self.device)
            extra = vision.model_inputs(self.model, ids.to(self.device), self.mask, ImageBatch.join(images))
            self.positions = extra["position_ids"].amax(dim=(0, 2))[:, None]  # each row's last position
            return self.forward(ids.to(self.device), groups, **extra)
        if any(len(p) != width for p in prompts):
            self.mask = mask.to(self.device)
            self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.forward(ids.to(self.device), groups)
        if self.positions is not None:
            self.positions = self.positions[:, -1:]
        return logits

    def select(self, index: torch.Tensor) -> bool:
        """Keep (and repeat) rows of the cache; False when this cache type cannot select rows."""
        if not hasattr(self.cache, "batch_select_indices"):
            return False
        self.cache.batch_select_indices(index)
        if self.mask is not None and self.positions is not None:
            self.mask, self.positions = self.mask[index], self.positions[index]
        return True

    def step(self, tokens: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        if self.mask is not None and self.positions is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
            self.positions = self.positions + 1
        return self.forward(tokens[:, None], groups)[:, -1, :].float()

    # ---- joining another batch (continuous batching) ------------------------------------------------

    def _layers(self) -> list[Any] | None:
        layers = getattr(self.cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
            return None  # only plain dynamic KV caches can be padded and joined
        return list(layers)

    def _explicit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's mask and last positions, made explicit when it had no padding."""
        if self.mask is not None and self.positions is not None:
            return self.mask, self.positions
        layers = self._layers()
        assert layers is not None
        rows, seen = layers[0].keys.shape[0], layers[0].keys.shape[-2]
        mask = torch.ones((rows, seen), dtype=torch.long, device=self.device)
        return mask, torch.full((rows, 1), seen - 1, dtype=torch.long, device=self.device)

    def join(self, other: DecodeBatch) -> bool:
        """Append `other`'s rows: both KV caches left-padded to one length (the padding masked out), then
        stacked. False (nothing changed) when either cache cannot be joined."""
        mine, theirs = self._layers(), other._layers()
        if mine is None or theirs is None or len(mine) != len(theirs):
            return False
        (mask_a, pos_a), (mask_b, pos_b) = self._explicit(), other._explicit()
        width = max(mask_a.shape[1], mask_b.shape[1])

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:
            pad = width - t.shape[dim]
            if pad == 0:
                return t
            shape = list(t.shape)
            shape[dim] = pad
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([left(a.keys, -2), left(b.keys, -2)], dim=0)
            a.values = torch.cat([left(a.values, -2), left(b.values, -2)], dim=0)
        self.mask = torch.cat([left(mask_a, 1), left(mask_b, 1)], dim=0)
        self.positions = torch.cat([pos_a, pos_b], dim=0)
        return True
