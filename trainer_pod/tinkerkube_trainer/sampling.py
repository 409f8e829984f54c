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
    """Prompt logprobs (NaN at 0 and before the last N) and the top-k table, from `(P, V)` logprobs."""
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
    return out


def _contains_any(text: str, needles: Sequence[str]) -> bool:
    return any(s in text for s in needles)


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    params: SampleParams,
    *,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    device: torch.device,
) -> SampleResult:
    """Generate `params.num_samples` sequences in lockstep; finished rows ride along until all stop."""
    n = params.num_samples
    prompt = torch.tensor(params.prompt, dtype=torch.long, device=device)
    out = model(input_ids=prompt[None].expand(n, -1), use_cache=True)
    cache, last = out.past_key_values, out.logits[:, -1, :].float()
    scores = {}
    if params.prompt_logprobs or params.topk_prompt_logprobs:
        scores = prompt_scores(torch.log_softmax(out.logits[0].float(), dim=-1), prompt, params)
    del out

    gen = _generator(params.seed, device)
    stop_ids = stop_token_set(params, eos_ids)
    stop_ids_t = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    stop_strings = tuple(s for s in params.stop_strings or () if s)  # "" would match before any token
    stopped = [False] * n
    for _ in range(params.max_tokens):
        logp = torch.log_softmax(last, dim=-1)
        if params.temperature == 0:
            nxt = torch.argmax(last, dim=-1)
        else:
            probs = torch.softmax(filter_logits(last / params.temperature, params.top_k, params.top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt_lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
        hit = torch.isin(nxt, stop_ids_t) if len(stop_ids) else torch.zeros_like(nxt, dtype=torch.bool)
        nxt_list, lp_list, hit_list = nxt.tolist(), nxt_lp.tolist(), hit.tolist()  # one sync per step
        for i in range(n):
            if done[i]:
                continue
            tokens[i].append(nxt_list[i])
            logprobs[i].append(lp_list[i])
            if hit_list[i] or (stop_strings and _contains_any(decode(tokens[i]), stop_strings)):
                done[i] = stopped[i] = True
        if all(done):
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1, :].float()
    seqs = [SampledSeq(tokens=tokens[i], logprobs=logprobs[i], stopped=stopped[i]) for i in range(n)]
    return SampleResult(
        sequences=seqs,
        prompt_logprobs=scores.get("prompt_logprobs"),
        topk_ids=scores.get("topk_ids"),
        topk_logprobs=scores.get("topk_logprobs"),
    )
