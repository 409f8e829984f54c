"""Generation: `num_samples` continuations of one prompt, batched together over one KV cache.

Why our own loop instead of `generate()`: Tinker needs exact per-token logprobs, first-occurrence
stop handling with the stop included once, `stop=[]` meaning "never stop", and a private RNG so that
sampling never shifts the training RNG. A loop over `past_key_values` gives all of that directly.

Logprobs: every returned logprob is `log softmax(logits)[token]` of the model's own distribution at
temperature 1, whatever temperature/top-k/top-p the tokens were drawn with. That is the quantity the
learner recomputes in forward_backward, so RL importance ratios `exp(lp - slp)` start at exactly 1
for on-policy data; at temperature ≠ 1 (or with top-k/top-p) they are therefore NOT the logprobs of
the tempered/truncated sampling distribution.

Stops: `stop=None` stops at EOS; stop strings or token ids stop at the first occurrence (and at EOS,
as vLLM does); `stop=[]` generates until max_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tinkerkube_trainer.codec import TOPK_PAD_LOGPROB, TOPK_PAD_TOKEN, SampledSeq, SampleParams, SampleResult


def stop_token_set(params: SampleParams, eos_ids: Sequence[int]) -> set[int]:
    if params.stop_tokens is None and params.stop_strings is None:
        return set(eos_ids)
    if not params.stop_tokens and not params.stop_strings:
        return set()  # stop=[]: no stopping at all, not even EOS
    return set(params.stop_tokens or ()) | set(eos_ids)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus; always keeps the best token."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic, and private: the global RNG is untouched
    else:
        gen.manual_seed(int(seed) % (2**63))
    return gen


def prompt_scores(logp: torch.Tensor, prompt: torch.Tensor, params: SampleParams) -> dict[str, np.ndarray]:
    """Prompt logprobs (NaN at 0 and before the last N), the top-k table and requested target ids'
    logprobs, all from the prompt's `(P, V)` logprobs."""
    p = prompt.shape[0]
    first = 1 if params.prompt_logprobs_last_n is None else p - params.prompt_logprobs_last_n
    out: dict[str, np.ndarray] = {}
    if params.prompt_logprobs:
        scores = torch.full((p,), float("nan"), dtype=torch.float32)
        picked = logp[:-1].gather(-1, prompt[1:, None]).squeeze(-1).float().cpu()
        scores[first:] = picked[first - 1 :]
        out["prompt_logprobs"] = scores.numpy()
    k = min(params.topk_prompt_logprobs, logp.shape[-1])
    if k > 0:
        ids = np.full((p, k), TOPK_PAD_TOKEN, dtype=np.int32)
        vals = np.full((p, k), TOPK_PAD_LOGPROB, dtype=np.float32)
        top = torch.topk(logp[:-1].float(), k, dim=-1)
        ids[first:] = top.indices[first - 1 :].cpu().numpy()
        vals[first:] = top.values[first - 1 :].cpu().numpy()
        out["topk_ids"], out["topk_logprobs"] = ids, vals
    if params.target_prompt_ids is not None:
        wanted = torch.as_tensor(params.target_prompt_ids, device=logp.device)
        picked = logp[:-1].float().gather(-1, wanted.clamp(min=0))
        out["target_prompt_logprobs"] = torch.where(wanted >= 0, picked, 0.0).cpu().numpy()
    return out


def _contains_any(text: str, needles: Sequence[str]) -> bool:
    return any(s in text for s in needles)


def _prefill(model: torch.nn.Module, prompt: torch.Tensor, n: int):
    """One forward over the prompt, its KV cache then copied for the n samples (a batch of n
    prompt copies where the cache type cannot be repeated)."""
    out = model(input_ids=prompt[None], use_cache=True)
    cache = out.past_key_values
    if n > 1:
        if hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(n)
        else:
            cache = model(input_ids=prompt[None].expand(n, -1), use_cache=True).past_key_values
    return out.logits[0].float(), cache


@dataclass(slots=True)
class _Rows:
    """Per-sample progress; `live` maps each batch row to its sample while finished rows drop out."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    topk: list[list[tuple[np.ndarray, np.ndarray]]]
    stopped: list[bool]
    live: list[int]


def _draw(last: torch.Tensor, params: SampleParams, gen: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return torch.argmax(last, dim=-1)
    probs = torch.softmax(filter_logits(last / params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    params: SampleParams,
    *,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
) -> SampleResult:
    """Generate `params.num_samples` sequences in lockstep over one KV cache; rows leave the batch
    (and the cache) as they stop."""
    n = params.num_samples
    prompt = torch.tensor(params.prompt, dtype=torch.long, device=device)
    prompt_logits, cache = _prefill(model, prompt, n)
    scores: dict[str, np.ndarray] = {}
    if params.prompt_logprobs or params.topk_prompt_logprobs or params.target_prompt_ids is not None:
        scores = prompt_scores(torch.log_softmax(prompt_logits, dim=-1), prompt, params)
    last = prompt_logits[-1:].expand(n, -1)
    del prompt_logits
    gen = _generator(params.seed, device)
    stop_ids = torch.tensor(sorted(stop_token_set(params, eos_ids)), dtype=torch.long, device=device)
    stop_strings = tuple(s for s in params.stop_strings or () if s)  # "" would match before any token
    # Every earlier step was checked, so a new match ends in the newest token: decoding a tail that
    # can hold the longest stop string (<= 4 bytes a char, >= 1 byte a token) is enough, and O(1).
    window = 4 * max((len(s) for s in stop_strings), default=0) + 8
    rows = _Rows([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [False] * n, list(range(n)))
    k = min(params.topk_sample_logprobs, last.shape[-1])
    for step in range(params.max_tokens):
        logp = torch.log_softmax(last, dim=-1)
        nxt = _draw(last, params, gen)
        hit = torch.isin(nxt, stop_ids).tolist()
        top = torch.topk(logp, k, dim=-1) if k else None
        chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()  # one host sync per step
        for b, (i, tok) in enumerate(zip(rows.live, nxt.tolist(), strict=True)):
            if rows.stopped[i]:
                continue  # a finished row kept in a cache that cannot drop rows
            rows.tokens[i].append(tok)
            rows.logprobs[i].append(chosen[b])
            if top is not None:
                rows.topk[i].append((top.indices[b].cpu().numpy(), top.values[b].cpu().numpy()))
            rows.stopped[i] = bool(hit[b]) or bool(stop_strings and _contains_any(
                decode(rows.tokens[i][-window:]), stop_strings))
        keep = [b for b, i in enumerate(rows.live) if not rows.stopped[i]]
        if not keep or step == params.max_tokens - 1:
            break
        if len(keep) < len(rows.live) and hasattr(cache, "batch_select_indices"):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            nxt, rows.live = nxt[index], [rows.live[b] for b in keep]
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1, :].float()
    return _result(rows, scores, k)


def _result(rows: _Rows, scores: dict[str, np.ndarray], k: int) -> SampleResult:
    seqs = []
    for i in range(len(rows.tokens)):
        topk_ids = topk_lps = None
        if k:
            topk_ids = np.stack([t[0] for t in rows.topk[i]]).astype(np.int32) if rows.topk[i] else np.zeros((0, k))
            topk_lps = np.stack([t[1] for t in rows.topk[i]]) if rows.topk[i] else np.zeros((0, k), np.float32)
        seqs.append(SampledSeq(rows.tokens[i], rows.logprobs[i], rows.stopped[i], topk_ids, topk_lps))
    return SampleResult(
        sequences=seqs,
        prompt_logprobs=scores.get("prompt_logprobs"),
        topk_ids=scores.get("topk_ids"),
        topk_logprobs=scores.get("topk_logprobs"),
        target_prompt_logprobs=scores.get("target_prompt_logprobs"),
    )
