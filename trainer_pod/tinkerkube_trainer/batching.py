"""Datums → one right-padded batch, and the contiguous data-parallel split.

Why one padded batch: a forward_backward call may carry hundreds of short datums; one forward over a
`(B, T)` batch is far faster than B forwards. Right padding keeps every real token at its own
position (position ids 0..N-1), and the causal mask keeps pads from influencing real tokens, so the
per-datum results equal unbatched ones up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tinkerkube_trainer.codec import DatumData
from tinkerkube_trainer.losses import FLOAT_INPUTS
from tinkerkube_trainer.vision import ImageBatch


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # int64 (B, T), pads are `pad_id`
    attention_mask: torch.Tensor  # int64 (B, T), 1 on real tokens
    targets: torch.Tensor  # int64 (B, T) or (B, T, K); pads are 0 (a valid index, masked out)
    mask: torch.Tensor  # float32 (B, T), 1.0 on real tokens
    float_inputs: dict[str, torch.Tensor]  # e.g. weights, logprobs, advantages: float32 (B, T)
    lengths: list[int]
    images: ImageBatch | None = None  # the rows' images in token order (numpy: moved by the forward)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            targets=self.targets.to(device),
            mask=self.mask.to(device),
            float_inputs={k: v.to(device) for k, v in self.float_inputs.items()},
            lengths=self.lengths,
            images=self.images,
        )


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous `[start, end)` of n items; sizes differ by at most one, earlier ranks larger.
    Contiguity lets rank 0 rebuild request order by concatenating the gathered shards."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"bad shard request n={n} rank={rank} world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def collate(datums: Sequence[DatumData], pad_id: int = 0) -> Batch:
    """Pad datums to the longest; float inputs present on any datum are padded with 0 on all.
    `(N, K)` target_tokens/weights (top-K distillation) become `(B, T, K)`. An empty sequence of
    datums gives a `(0, 0)` batch (a rank with no shard still joins the collectives)."""
    lengths = [int(d.tokens.shape[0]) for d in datums]
    b, t = len(datums), max(lengths, default=0)
    trailing = next((d.inputs["target_tokens"].shape[1:] for d in datums if "target_tokens" in d.inputs), ())
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    targets = np.zeros((b, t, *trailing), dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.float32)
    names = sorted({k for d in datums for k in d.inputs if k in FLOAT_INPUTS})
    floats = {k: np.zeros((b, t, *(trailing if k == "weights" else ())), dtype=np.float32) for k in names}
    for i, d in enumerate(datums):
        n = lengths[i]
        input_ids[i, :n] = d.tokens
        mask[i, :n] = 1.0
        if "target_tokens" in d.inputs:
            targets[i, :n] = d.inputs["target_tokens"]
        for k in names:
            if k in d.inputs:
                floats[k][i, :n] = d.inputs[k]
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy((mask > 0).astype(np.int64)),
        targets=torch.from_numpy(targets),
        mask=torch.from_numpy(mask),
        float_inputs={k: torch.from_numpy(v) for k, v in floats.items()},
        lengths=lengths,
        images=ImageBatch.join([d.images for d in datums]),
    )


def micro_batches(datums: Sequence[DatumData], max_tokens: int) -> list[Sequence[DatumData]]:
    """Consecutive groups whose padded size (rows times longest) stays within `max_tokens`: one group
    whenever the whole shard fits, so the usual call is one forward. A datum longer than the budget
    still gets a group of its own."""
    groups: list[Sequence[DatumData]] = []
    start, longest = 0, 0
    for i, d in enumerate(datums):
        n = int(d.tokens.shape[0])
        if i > start and max(longest, n) * (i - start + 1) > max_tokens:
            groups.append(datums[start:i])
            start, longest = i, 0
        longest = max(longest, n)
    if start < len(datums):
        groups.append(datums[start:])
    return groups
