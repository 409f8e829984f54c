"""Generation: every pending request's `num_samples` continuations, batched together over one KV cache.

Why one batch for many requests: a pool serves several runs and samplers at once; their rows decode
together (each through its own adapter, with its own sampling params, stops and seed) so the model's
matmuls see one large batch instead of many small ones. Prompts are left-padded with position ids
that count real tokens only, so a request's logits are what it gets alone up to float rounding.

Why our own loop instead of `generate()`: Tinker needs exact per-token logprobs, first-occurrence
stop handling with the stop included once, `stop=[]` meaning "never stop", and a private RNG so that
sampling never shifts the training RNG. A loop over `past_key_values` gives all of that directly.

Logprobs: every returned logprob is `log softmax(logits)[token]` of the model's own distribution at
temperature 1, whatever temperature/top-k/top-p the tokens were drawn with. That is the quantity the
learner recomputes in forward_backward, so RL importance ratios `exp(lp - slp)` start at exactly 1
for on-policy data; at temperature ≠ 1 (or with top-k/top-p) they are therefore NOT the logprobs of
the tempered/truncated sampling distribution. The same holds for `prompt_alt_tokens_k` draws
(`token_draw.draw_prompt_alternatives`): drawn at the request's temperature/top-k/top-p from the prefill's
logits, reported with their temperature-1 logprobs.

Stops: `stop=None` stops at EOS; stop strings or token ids stop at the first occurrence (and at EOS,
as vLLM does); `stop=[]` generates until max_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tinkerkube_trainer.codec import TOPK_PAD_LOGPROB, TOPK_PAD_TOKEN, SampledSeq, SampleParams, SampleResult
from tinkerkube_trainer.decode_batch import DecodeBatch
from tinkerkube_trainer.multilora import LoraWeights, Routing, RowGroup
from tinkerkube_trainer.sample_progress import Progress
from tinkerkube_trainer.token_draw import draw, draw_prompt_alternatives, generator


def stop_token_set(params: SampleParams, eos_ids: Sequence[int]) -> set[int]:
    if params.stop_tokens is None and params.stop_strings is None:
        return set(eos_ids)
    if not params.stop_tokens and not params.stop_strings:
        return set()  # stop=[]: no stopping at all, not even EOS
    return set(params.stop_tokens or ()) | set(eos_ids)


def wants_prompt_scores(params: SampleParams) -> bool:
    """Whether the prefill's logits must be kept for the prompt: its logprobs, top-k, target ids or alternatives."""
    return (params.prompt_logprobs or params.topk_prompt_logprobs > 0 or params.target_prompt_ids is not None
            or params.prompt_alt_tokens_k > 0)


def prompt_scores(logp: torch.Tensor, prompt: torch.Tensor, params: SampleParams) -> dict[str, np.ndarray]:
    """Prompt logprobs (NaN at 0 and before the last N), the top-k table and requested target ids'
    logprobs, all from the prompt's `(P, V)` logprobs."""
    picked = top_ids = top_vals = target = None
    if params.prompt_logprobs:
        picked = logp[:-1].gather(-1, prompt[1:, None]).squeeze(-1).float().cpu().numpy()
    k = min(params.topk_prompt_logprobs, logp.shape[-1])
    if k > 0:
        top = torch.topk(logp[:-1].float(), k, dim=-1)
        top_ids, top_vals = top.indices.cpu().numpy(), top.values.cpu().numpy()
    if params.target_prompt_ids is not None:
        wanted = torch.as_tensor(params.target_prompt_ids, device=logp.device)
        chosen = logp[:-1].float().gather(-1, wanted.clamp(min=0))
        target = torch.where(wanted >= 0, chosen, 0.0).cpu().numpy()
    return shape_prompt_scores(params, prompt.shape[0], picked, top_ids, top_vals, target)


def shape_prompt_scores(params: SampleParams, p: int, picked: np.ndarray | None, top_ids: np.ndarray | None,
                        top_vals: np.ndarray | None, target: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The response's prompt arrays from per-position scores of prompt tokens 1..P-1 (`picked`: (P-1,),
    `top_*`: (P-1, k)): NaN / padding at position 0 and before the last N. Every sampler backend
    shapes its prompt scores here, so they all answer alike."""
    first = 1 if params.prompt_logprobs_last_n is None else p - params.prompt_logprobs_last_n
    out: dict[str, np.ndarray] = {}
    if picked is not None:
        scores = np.full((p,), np.nan, dtype=np.float32)
        scores[first:] = picked[first - 1 :]
        out["prompt_logprobs"] = scores
    if top_ids is not None and top_vals is not None:
        k = top_ids.shape[-1]
        ids = np.full((p, k), TOPK_PAD_TOKEN, dtype=np.int32)
        vals = np.full((p, k), TOPK_PAD_LOGPROB, dtype=np.float32)
        ids[first:] = top_ids[first - 1 :]
        vals[first:] = top_vals[first - 1 :]
        out["topk_ids"], out["topk_logprobs"] = ids, vals
    if target is not None:
        out["target_prompt_logprobs"] = np.asarray(target, dtype=np.float32)
    return out


def _contains_any(text: str, needles: Sequence[str]) -> bool:
    return any(s in text for s in needles)


@dataclass(frozen=True, slots=True)
class SampleJob:
    """One sample request of a batch: its params and the adapter its rows go through (None: base)."""

    params: SampleParams
    weights: LoraWeights | None = None
    progress: Progress | None = None  # where a streaming reader sees its tokens as they are decoded


@dataclass(slots=True)
class _Job:
    """A request's decoding state; its rows are contiguous in the batch and stay so as rows leave."""

    params: SampleParams
    weights: LoraWeights | None
    gen: torch.Generator
    stop_ids: torch.Tensor
    stop_strings: tuple[str, ...]
    window: int  # tail of tokens decoded to look for a stop string
    k: int  # top-k sample logprobs per step
    tokens: list[list[int]]
    logprobs: list[list[float]]
    topk: list[list[tuple[np.ndarray, np.ndarray]]]
    stopped: list[bool]
    scores: dict[str, np.ndarray]
    progress: Progress | None

    def finished(self, sample: int) -> bool:
        if self.progress is not None and self.progress.stop_now:
            return True  # cancelled: its rows leave the batch now
        return self.stopped[sample] or len(self.tokens[sample]) >= self.params.max_tokens


def _new_job(job: SampleJob, eos_ids: Sequence[int], vocab: int, device: torch.device) -> _Job:
    p, n = job.params, job.params.num_samples
    stop_strings = tuple(s for s in p.stop_strings or () if s)  # "" would match before any token
    # Every earlier step was checked, so a new match ends in the newest token: decoding a tail that
    # can hold the longest stop string (<= 4 bytes a char, >= 1 byte a token) is enough, and O(1).
    window = 4 * max((len(s) for s in stop_strings), default=0) + 8
    lists = job.progress or Progress()
    lists.bind(n)  # the decoder appends to the progress's own lists: streaming readers see them at once
    return _Job(p, job.weights, generator(p.seed, device),
                torch.tensor(sorted(stop_token_set(p, eos_ids)), dtype=torch.long, device=device), stop_strings,
                window, min(p.topk_sample_logprobs, vocab), lists.tokens, lists.logprobs, lists.topk, [False] * n, {},
                job.progress)


def _groups(live: Sequence[tuple[int, int]], jobs: Sequence[_Job]) -> list[RowGroup]:
    """Consecutive rows of one request share its adapter: one routing group per request."""
    groups: list[RowGroup] = []
    for row, (j, _) in enumerate(live):
        if groups and live[row - 1][0] == j:
            groups[-1] = RowGroup(groups[-1].start, row + 1, jobs[j].weights)
        else:
            groups.append(RowGroup(row, row + 1, jobs[j].weights))
    return groups


Key = Any  # what the caller names a request by (echoed to `on_done`)


class Decoder:
    """A running decode that requests can join at step boundaries (continuous batching). Each request's
    rows stay contiguous; requests leave as they finish and are reported at once through `on_done`."""

    def __init__(self, model: torch.nn.Module, *, eos_ids: Sequence[int], decode: Callable[[list[int]], str],
                 device: torch.device, routing: Routing | None,
                 on_done: Callable[[Key, SampleResult], None], on_step: Callable[[], None] | None = None) -> None:
        self.model, self.eos_ids, self.decode, self.device, self.routing = model, eos_ids, decode, device, routing
        self.on_done, self.on_step = on_done, on_step
        self.batch: DecodeBatch | None = None
        self.jobs: list[_Job] = []
        self.keys: list[Key] = []
        self.live: list[tuple[int, int]] = []  # (job, sample) per batch row
        self.last: torch.Tensor | None = None  # (rows, V) logits to draw the next tokens from
        self.can_drop = True
        self.reported: set[int] = set()

    @property
    def rows(self) -> int:
        return len(self.live)

    def admit(self, requests: Sequence[tuple[Key, SampleJob]]) -> bool:
        """Prefill `requests` and join them to the running rows; False when they cannot join the running
        batch (its cache type), so the caller admits them once it is empty."""
        if not requests:
            return True
        batch = DecodeBatch(self.model, self.routing, self.device)
        groups = [RowGroup(i, i + 1, r.weights) for i, (_, r) in enumerate(requests)]
        logits = batch.prefill([r.params.prompt for _, r in requests], groups, [r.params.images for _, r in requests])
        first = len(self.jobs)
        jobs = [_new_job(r, self.eos_ids, logits.shape[-1], self.device) for _, r in requests]
        width = logits.shape[1]
        for i, job in enumerate(jobs):
            p = job.params
            if wants_prompt_scores(p):
                own = logits[i, width - len(p.prompt):].float()
                logp = torch.log_softmax(own, dim=-1)
                job.scores = prompt_scores(logp, torch.tensor(p.prompt, device=self.device), p)
                if p.prompt_alt_tokens_k:  # their own generator: the sampled continuation is unchanged
                    job.scores.update(draw_prompt_alternatives(own, logp, p))
        live = [(first + j, s) for j, job in enumerate(jobs) if job.params.max_tokens > 0
                for s in range(job.params.num_samples)]
        rows = [j - first for j, _ in live]
        last = logits[:, -1, :].float()[torch.tensor(rows, dtype=torch.long, device=self.device)]
        del logits
        if live and rows != list(range(len(requests))) and not batch.select(torch.tensor(rows, device=self.device)):
            # A cache that cannot repeat rows: prefill again with one prompt copy per sample.
            batch = DecodeBatch(self.model, self.routing, self.device)
            groups = [RowGroup(b, b + 1, jobs[j - first].weights) for b, (j, _) in enumerate(live)]
            last = batch.prefill([jobs[j - first].params.prompt for j, _ in live], groups,
                                 [jobs[j - first].params.images for j, _ in live])[:, -1, :].float()
        if live:
            if not self.live:
                self.batch, self.last = batch, last
            elif self.batch is not None and self.batch.join(batch):
                self.last = torch.cat([self.last, last], dim=0)  # type: ignore[list-item]
            else:
                return False
        self.jobs.extend(jobs)
        self.keys.extend(k for k, _ in requests)
        self.live.extend(live)
        for j, job in enumerate(jobs, start=first):
            if job.params.max_tokens == 0:
                self._report(j)
        return True

    def _report(self, j: int) -> None:
        if j not in self.reported:
            self.reported.add(j)
            self.on_done(self.keys[j], _result(self.jobs[j]))

    def step(self) -> None:
        """One token for every live row; requests whose samples are all done are reported and leave."""
        assert self.batch is not None and self.last is not None
        nxt = _decode_step(self.last, self.live, self.jobs, self.decode)
        for j in sorted({j for j, _ in self.live}):
            job = self.jobs[j]
            if job.progress is not None:
                job.progress.publish()
            if all(job.finished(s) for s in range(job.params.num_samples)):
                self._report(j)
        if self.on_step is not None:
            self.on_step()
        keep = [b for b, (j, s) in enumerate(self.live) if not self.jobs[j].finished(s)]
        if not keep:
            self.live, self.last, self.batch = [], None, None
            return
        if len(keep) < len(self.live) and self.can_drop:
            index = torch.tensor(keep, device=self.device)
            if self.batch.select(index):
                nxt, self.live = nxt[index], [self.live[b] for b in keep]
            else:
                self.can_drop = False  # finished rows stay in the batch; their draws are ignored
        self.last = self.batch.step(nxt, _groups(self.live, self.jobs))


@torch.inference_mode()
def decode_stream(
    model: torch.nn.Module,
    take: Callable[[], Sequence[tuple[Key, SampleJob]]],
    on_done: Callable[[Key, SampleResult], None],
    *,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
    routing: Routing | None = None,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Decode every request `take` hands over, joining new ones at step boundaries (continuous
    batching: one prefill per arriving group, its KV cache then repeated for its samples), each row
    through its request's adapter with its request's sampling params, stops and private RNG; each
    request is reported through `on_done` as soon as all its samples are done; `on_step` is told after each
    step (streaming readers wait for it). Returns when nothing is running and `take` has nothing more."""
    decoder = Decoder(model, eos_ids=eos_ids, decode=decode, device=device, routing=routing, on_done=on_done,
                      on_step=on_step)
    waiting: list[tuple[Key, SampleJob]] = []
    while True:
        waiting.extend(take())
        if waiting and decoder.admit(waiting):
            waiting = []
        if not decoder.rows:
            if not waiting:
                return
            continue
        decoder.step()


def sample_batch(
    model: torch.nn.Module,
    requests: Sequence[SampleJob],
    *,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
    routing: Routing | None = None,
) -> list[SampleResult]:
    """Every request decoded together (`decode_stream` of requests all there at the start)."""
    pending = [list(enumerate(requests))]
    results: dict[int, SampleResult] = {}
    decode_stream(model, lambda: pending.pop() if pending else [], results.__setitem__, eos_ids=eos_ids,
                  decode=decode, device=device, routing=routing)
    return [results[i] for i in range(len(requests))]


def _decode_step(last: torch.Tensor, live: list[tuple[int, int]], jobs: list[_Job],
                 decode: Callable[[list[int]], str]) -> torch.Tensor:
    """Draw the next token of every live row (per request: its params and generator) and record it."""
    logp = torch.log_softmax(last, dim=-1)
    nxt = torch.empty(len(live), dtype=torch.long, device=last.device)
    start = 0
    while start < len(live):
        j = live[start][0]
        end = start
        while end < len(live) and live[end][0] == j:
            end += 1
        nxt[start:end] = draw(last[start:end], jobs[j].params, jobs[j].gen)[:, 0]
        start = end
    chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()  # one host sync per step
    tokens = nxt.tolist()
    for b, (j, s) in enumerate(live):
        job = jobs[j]
        if job.finished(s):
            continue  # a finished row kept in a cache that cannot drop rows
        job.tokens[s].append(tokens[b])
        job.logprobs[s].append(chosen[b])
        if job.k:
            top = torch.topk(logp[b], job.k)
            job.topk[s].append((top.indices.cpu().numpy(), top.values.cpu().numpy()))
        job.stopped[s] = bool(torch.isin(nxt[b], job.stop_ids)) or bool(job.stop_strings and _contains_any(
            decode(job.tokens[s][-job.window:]), job.stop_strings))
    return nxt


def sample(
    model: torch.nn.Module,
    params: SampleParams,
    *,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
    routing: Routing | None = None,
    weights: LoraWeights | None = None,
) -> SampleResult:
    """One request alone (`sample_batch` of one)."""
    return sample_batch(model, [SampleJob(params, weights)], eos_ids=eos_ids, decode=decode, device=device,
                        routing=routing)[0]


def _result(job: _Job) -> SampleResult:
    return make_result(job.tokens, job.logprobs, job.stopped, job.topk, job.k, job.scores)


def make_result(tokens: Sequence[list[int]], logprobs: Sequence[list[float]], stopped: Sequence[bool],
                topk: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], k: int,
                scores: dict[str, np.ndarray]) -> SampleResult:
    """A request's result from its samples' tokens, logprobs, stop flags and per-step top-k (ids, logprobs)
    and its `shape_prompt_scores`: the one place every sampler backend builds its answer."""
    seqs = []
    for i in range(len(tokens)):
        topk_ids = topk_lps = None
        if k:
            topk_ids = np.stack([t[0] for t in topk[i]]).astype(np.int32) if topk[i] else np.zeros((0, k))
            topk_lps = np.stack([t[1] for t in topk[i]]) if topk[i] else np.zeros((0, k), np.float32)
        seqs.append(SampledSeq(tokens[i], logprobs[i], stopped[i], topk_ids, topk_lps))
    return SampleResult(
        sequences=seqs,
        prompt_logprobs=scores.get("prompt_logprobs"),
        topk_ids=scores.get("topk_ids"),
        topk_logprobs=scores.get("topk_logprobs"),
        target_prompt_logprobs=scores.get("target_prompt_logprobs"),
        alt_tokens=scores.get("alt_tokens"),
        alt_logprobs=scores.get("alt_logprobs"),
    )
