"""How a token is drawn from logits: temperature, the top-k/top-p filter and a private generator; once
per decode step for a sampled token (`draw`), and `prompt_alt_tokens_k` times per prompt position for a
request's prompt alternatives (`draw_prompt_alternatives`), by the same rule.

Why the alternatives have a generator of their own (the request's seed, offset): asking for them must not
change the sampled continuation, and a seeded request must give the same draws every time, alone or
co-batched. Their logprobs follow `sampling`'s convention: log softmax of the model's own logits at
temperature 1, whatever temperature/top-k/top-p they were drawn with.
"""

from __future__ import annotations

import numpy as np
import torch

from tinkerkube_trainer.codec import SampleParams

ALT_SEED_OFFSET = 0x5DEECE66D  # alt draws of seed s use generator seed s + this; sampled tokens use s itself
ALT_ROWS_AT_ONCE = 512  # prompt positions drawn together (a constant: it fixes the order of a seed's draws)


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


def generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic, and private: the global RNG is untouched
    else:
        gen.manual_seed(int(seed) % (2**63))
    return gen


def draw(logits: torch.Tensor, params: SampleParams, gen: torch.Generator, k: int = 1) -> torch.Tensor:
    """`k` draws with replacement per row of `(rows, V)` logits → `(rows, k)`; temperature 0 is the argmax."""
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True).expand(-1, k)
    probs = torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, k, replacement=k > 1, generator=gen)  # k = 1: the decode's draw, as ever


def draw_prompt_alternatives(logits: torch.Tensor, logp: torch.Tensor,
                             params: SampleParams) -> dict[str, np.ndarray]:
    """`params.prompt_alt_tokens_k` draws at every prompt position after the first, from the prompt's own
    `(P, V)` logits and their log softmax: `alt_tokens` int64 and `alt_logprobs` float32, both `(P - 1, k)`
    (row i: alternatives to prompt[i + 1]). A one-token prompt gets `(0, k)`."""
    k = params.prompt_alt_tokens_k
    gen = generator(None if params.seed is None else int(params.seed) + ALT_SEED_OFFSET, logits.device)
    rows = logits.shape[0] - 1
    tokens = torch.zeros((max(rows, 0), k), dtype=torch.long, device=logits.device)
    for start in range(0, rows, ALT_ROWS_AT_ONCE):  # bounded temporaries (softmax, top-p sort) on long prompts
        end = min(start + ALT_ROWS_AT_ONCE, rows)
        tokens[start:end] = draw(logits[start:end], params, gen, k)
    chosen = logp[:rows].gather(-1, tokens)
    return {"alt_tokens": tokens.cpu().numpy().astype(np.int64),
            "alt_logprobs": chosen.float().cpu().numpy().astype(np.float32)}
