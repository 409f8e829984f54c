"""One forward(+backward) pass over the pending forward/forward_backward ops of several runs.

Why co-batched: a pool's runs share one base model; their pending ops run as one forward over the
concatenated rows (each row through its own run's adapter, `multilora.RowGroup`), which keeps the
matrix units busy where one small batch per run would not. Each op is collated on its own (its own
padding, float inputs and targets, exactly as it would be alone), the collated chunks are stacked
into micro-batches under a logits budget, and each op's loss is computed from its own rows only and
summed with the others' before one backward: a run's adapter only meets its own rows, so its loss,
outputs and gradients are what it would get alone, up to the float rounding of a larger matmul.

Each rank takes a contiguous shard of every op's datums; gradients are all-reduce-SUMmed (Tinker
sums losses over tokens and datums) in one collective for all ops of the pass, and rank 0 rebuilds
each op's outputs in request order from the gathered shards.

On a sharded base (`sharding: fsdp`) every forward and backward is also a series of collectives (one
all-gather per layer), so every rank must run as many of each, in the same order, whatever its share
of the rows: ranks agree on the number of micro-batches (a rank with fewer rows runs one-token idle
forwards), every micro-batch of a training pass runs a backward (a zero one when it holds no training
rows), and the embeddings' output requires grad (`fsdp.grads_through_every_layer`) so that every
layer's backward all-gather happens on every rank, whichever layers the adapters of its rows touch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tinkerkube_contract.pod_api import CONTENT_PROTOBUF
from tinkerkube_trainer import codec, custom_loss_run, vision
from tinkerkube_trainer.batching import Batch, collate, micro_batches, shard_bounds
from tinkerkube_trainer.engine_api import Collective, OpError, OpOutput
from tinkerkube_trainer.losses import LOSSES, LossConfig, LossInputs, reduce_sum
from tinkerkube_trainer.multilora import LoraWeights, Routing, RowGroup
from tinkerkube_trainer.optim import all_finite
from tinkerkube_trainer.vision import ImageBatch

MAX_LOGITS_PER_FORWARD = 2**28  # fp32 logits per micro-batch (1 GiB): one forward unless memory demands more
_FLOAT_FIELDS = {"weights": "weights", "logprobs": "sampling_logprobs", "advantages": "advantages",
                 "clip_low_threshold": "clip_low", "clip_high_threshold": "clip_high",
                 "sequence_ratio_mask": "sequence_ratio_mask"}


@dataclass(frozen=True, slots=True)
class FbPayload:
    request: codec.ForwardBackwardPayload
    loss: str
    cfg: LossConfig
    custom: custom_loss_run.CustomPayload | None = None  # loss "custom": the stored loss and its inputs

    @property
    def train(self) -> bool:
        return not self.request.forward_only

    @property
    def num_tokens(self) -> int:
        return sum(int(d.tokens.shape[0]) for d in self.request.datums)


@dataclass(slots=True)
class FbWork:
    """One op of the pass: its run's adapter and its decoded request. `grads` (summed over ranks, in
    `weights.parameters()` order) and `output` (rank 0) are filled in by `run`; `error` when the op
    cannot be applied (nothing of it may then be accumulated)."""

    weights: LoraWeights
    payload: FbPayload
    grads: list[torch.Tensor] | None = None
    output: OpOutput | None = None
    error: OpError | None = None
    _outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    _loss: float = 0.0
    _metrics: dict[str, float] = field(default_factory=dict)  # a custom loss's, summed over datums
    _failed: str | None = None  # why this rank could not run the op's custom loss (the op alone fails)


@dataclass(frozen=True, slots=True)
class _Chunk:
    work: int  # index into the pass's works
    batch: Batch
    first: int  # the index of the batch's first row among its op's datums


class Model:
    """What a pass needs of the pool's model (kept small so tests can build one around any model)."""

    def __init__(self, module: torch.nn.Module, routing: Routing, *, pad_id: int, vocab_size: int,
                 device: torch.device, sharded: bool = False) -> None:
        self.module, self.routing = module, routing
        self.pad_id, self.vocab_size, self.device = pad_id, vocab_size, device
        self.sharded = sharded  # every rank must run the same forwards and backwards (module docstring)
        self.multimodal = vision.is_multimodal(module)

    def idle(self, backward: bool) -> None:
        """A one-token forward (and backward) through no adapter: this rank's part of the collectives of a
        micro-batch it has no rows for. Touches no gradient of any adapter."""
        with torch.enable_grad() if backward else torch.inference_mode():
            ids = torch.full((1, 1), self.pad_id, device=self.device)
            logits = self.module(input_ids=ids, use_cache=False).logits
            if backward:
                (logits.float().sum() * 0.0).backward()

    def logits(self, chunks: Sequence[_Chunk], works: Sequence[FbWork]) -> tuple[torch.Tensor, list[int]]:
        """One forward over the chunks' rows; returns fp32 logits `(rows, T, V)` and each chunk's first row."""
        width = max(c.batch.input_ids.shape[1] for c in chunks)
        ids, masks, starts, groups, row = [], [], [], [], 0
        equal = len({n for c in chunks for n in c.batch.lengths}) == 1
        for c in chunks:
            n, t = c.batch.input_ids.shape
            ids.append(torch.nn.functional.pad(c.batch.input_ids, (0, width - t), value=self.pad_id))
            masks.append(torch.nn.functional.pad(c.batch.attention_mask, (0, width - t)))
            groups.append(RowGroup(row, row + n, works[c.work].weights))
            starts.append(row)
            row += n
        input_ids = torch.cat(ids).to(self.device)
        if self.multimodal:  # images (in row order) and 3-axis positions; text-only rows too (no stale state)
            kwargs = vision.model_inputs(self.module, input_ids, torch.cat(masks).to(self.device),
                                         ImageBatch.join([c.batch.images for c in chunks]))
        else:  # No padding anywhere (equal lengths): no mask, so attention takes its plain causal fast path.
            kwargs = {"attention_mask": None if equal else torch.cat(masks).to(self.device)}
        with self.routing.route(groups):
            logits = self.module(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
        return logits, starts


def _token_logprobs(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The targets' entries of log-softmaxed logits `logp`."""
    if targets.dim() == 3:  # (B, T, K) top-K targets: logprobs per slot
        return logp.gather(-1, targets)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunks(works: Sequence[FbWork], rank: int, world: int, budget: int, pad_id: int) -> list[list[_Chunk]]:
    """Each op's shard collated on its own (in budget-sized pieces), packed into micro-batches."""
    pieces: list[_Chunk] = []
    for i, w in enumerate(works):
        datums = w.payload.request.datums
        start, end = shard_bounds(len(datums), rank, world)
        for group in micro_batches(datums[start:end], budget):
            pieces.append(_Chunk(i, collate(group, pad_id), start))
            start += len(group)
    batches: list[list[_Chunk]] = []
    rows, width = 0, 0
    for piece in pieces:
        n, t = piece.batch.input_ids.shape
        if batches and (rows + n) * max(width, t) <= budget:
            batches[-1].append(piece)
            rows, width = rows + n, max(width, t)
        else:
            batches.append([piece])
            rows, width = n, t
    return batches


def _micro_batch(model: Model, chunks: list[_Chunk], works: Sequence[FbWork], pass_trains: bool) -> None:
    training = any(works[c.work].payload.train for c in chunks)
    if model.sharded:  # the same backwards on every rank (module docstring)
        training = pass_trains
    # No KV cache (a pass never decodes on) and, for forward-only passes, no autograd bookkeeping at all:
    # on small ops the model's per-layer Python overhead is most of the compute (~15% less, measured).
    with torch.enable_grad() if training else torch.inference_mode():
        logits, starts = model.logits(chunks, works)
        # One fused log_softmax (as the sampler computes logprobs), not gather - logsumexp: that ran as
        # separate max/sub/exp/sum kernels forward and back, ~3% of a small step (measured). It keeps one
        # (rows, T, V) tensor for the backward, as logsumexp kept the logits.
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        total: torch.Tensor | None = None
        for chunk, start in zip(chunks, starts, strict=True):
            work, batch = works[chunk.work], chunk.batch.to(model.device)
            n, t = batch.input_ids.shape
            lp = _token_logprobs(logp[start:start + n, :t], batch.targets)
            if work.payload.custom is not None:
                if work._failed is not None:
                    continue
                try:
                    loss = _custom_loss(work, chunk, lp)
                except OpError as exc:  # the meta run passed, so rare: this op fails, not the pass
                    work._failed = exc.message
                    continue
            else:
                inputs = {_FLOAT_FIELDS[k]: v for k, v in batch.float_inputs.items()}
                per_token = LOSSES[work.payload.loss](LossInputs(target_logprobs=lp, mask=batch.mask, **inputs),
                                                      work.payload.cfg)
                loss = reduce_sum(per_token)
                lp_np, loss_np = lp.detach().cpu().numpy(), per_token.detach().float().cpu().numpy()
                work._outputs.extend({"logprobs": lp_np[i, :m], "elementwise_loss": loss_np[i, :m]}
                                     for i, m in enumerate(batch.lengths))
            if work.payload.train:
                total = loss if total is None else total + loss
            work._loss += float(loss.detach())
        if total is None and training:
            total = logp.sum() * 0.0
        del logp
        if total is not None:
            total.backward()


def _custom_loss(work: FbWork, chunk: _Chunk, lp: torch.Tensor) -> torch.Tensor:
    """The chunk's rows through the op's stored custom loss, one datum at a time (as the SDK runs it)."""
    custom = work.payload.custom
    assert custom is not None
    total: torch.Tensor | None = None
    for i, m in enumerate(chunk.batch.lengths):
        row = lp[i, :m]
        loss, metrics = custom_loss_run.datum_loss(custom, chunk.first + i, row)
        total = loss if total is None else total + loss
        for key, value in metrics.items():
            work._metrics[key] = work._metrics.get(key, 0.0) + value
        work._outputs.append({"logprobs": row.detach().cpu().numpy()})
    assert total is not None
    return total


def _custom_metrics(w: FbWork, gathered: Sequence[Sequence[tuple[object, float, dict[str, float], object]]],
                    i: int) -> dict[str, float]:
    """The custom loss's metrics over every rank's datums: `:sum` summed, `:mean` over the datums."""
    sums: dict[str, float] = {}
    for per_rank in gathered:
        for key, value in per_rank[i][2].items():
            sums[key] = sums.get(key, 0.0) + value
    n = len(w.payload.request.datums)
    return {key: value / n if key.endswith(":mean") else value for key, value in sums.items()}


def run(model: Model, collective: Collective, works: Sequence[FbWork]) -> None:
    """Run the pass on this rank (every rank runs the same works): fills each work's grads, output
    (rank 0) or error. Ops whose loss or gradients are not finite fail as the user's error with
    nothing accumulated."""
    rank, world = collective.rank, collective.world_size
    params = [p for w in works if w.payload.train for p in w.weights.parameters()]
    for p in params:
        p.grad = None
    budget = max(1, MAX_LOGITS_PER_FORWARD // model.vocab_size)
    try:
        batches = _chunks(works, rank, world, budget, model.pad_id)
        pass_trains = any(w.payload.train for w in works)
        # Agreed before any forward: a rank waiting here would leave the others' all-gathers unanswered.
        idle = max(collective.all_gather_object(len(batches))) - len(batches) if model.sharded else 0
        for chunks in batches:
            _micro_batch(model, chunks, works, pass_trains)
        for _ in range(idle):
            model.idle(backward=pass_trains)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        collective.all_reduce_sum_(grads)  # one collective for every run of the pass; SUM, never average
    finally:
        for p in params:
            p.grad = None
    offset = 0
    for w in works:
        if w.payload.train:
            n = len(w.weights.parameters())
            w.grads, offset = grads[offset:offset + n], offset + n
    gathered = collective.all_gather_object([(w._outputs, w._loss, w._metrics, w._failed) for w in works])
    for i, w in enumerate(works):
        failed = next((per_rank[i][3] for per_rank in gathered if per_rank[i][3] is not None), None)
        if failed is not None:
            w.grads, w.error = None, OpError(f"{failed}: nothing was accumulated", code="invalid_custom_loss")
            continue
        loss = sum(per_rank[i][1] for per_rank in gathered)
        if not np.isfinite(loss) or (w.grads is not None and not all_finite(w.grads)):
            w.grads = None
            w.error = OpError(
                f"the {w.payload.loss} loss of this batch is not finite (loss {loss}): nothing was accumulated; "
                "check the inputs (logprobs, advantages, weights) and loss_fn_config", code="non_finite_loss")
            continue
        if rank == 0:
            merged = [o for per_rank in gathered for o in per_rank[i][0]]
            metrics = {"loss:sum": loss, "num_tokens:sum": float(w.payload.num_tokens),
                       **_custom_metrics(w, gathered, i)}
            w.output = OpOutput(CONTENT_PROTOBUF, codec.encode_forward_backward_output(merged, metrics))
        else:
            w.output = OpOutput(CONTENT_PROTOBUF, b"")
