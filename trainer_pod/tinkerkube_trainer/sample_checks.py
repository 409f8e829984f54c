"""The bounds of a decoded sample request, checked on rank 0 before anything runs: each one a user error
(`invalid_sample_request`), so bad input never reaches the decode loop. Token ids against the vocabulary
are checked where the vocabulary is known (`op_decode`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tinkerkube_contract.pod_api import MAX_PROMPT_ALT_TOKEN_CELLS, MAX_PROMPT_ALT_TOKENS_K
from tinkerkube_trainer.engine_api import OpError

if TYPE_CHECKING:  # codec calls this module: a runtime import would be circular
    from tinkerkube_trainer.codec import SampleParams


def validate_sample(p: SampleParams) -> None:
    def bad(msg: str) -> OpError:
        return OpError(msg, code="invalid_sample_request")

    if not p.prompt:
        raise bad("the prompt is empty")
    if not (math.isfinite(p.temperature) and math.isfinite(p.top_p)):
        raise bad("temperature and top_p must be finite numbers")
    if p.num_samples < 1:
        raise bad("num_samples must be at least 1")
    if p.max_tokens < 0:
        raise bad("max_tokens must not be negative")
    if p.temperature < 0:
        raise bad("temperature must not be negative")
    if p.top_k == 0 or p.top_k < -1:
        raise bad("top_k must be -1 (off) or positive")
    if not 0 < p.top_p <= 1:
        raise bad("top_p must be in (0, 1]")
    if p.topk_prompt_logprobs < 0:
        raise bad("topk_prompt_logprobs must not be negative")
    if p.prompt_logprobs_last_n is not None and not 1 <= p.prompt_logprobs_last_n <= len(p.prompt) - 1:
        raise bad("prompt_logprobs_last_n must be between 1 and len(prompt) - 1")
    if p.topk_sample_logprobs < 0:
        raise bad("topk_sample_logprobs must not be negative")
    ids = p.target_prompt_ids
    if ids is not None and (ids.shape[0] != len(p.prompt) - 1 or (ids.size and ids.min() < -1)):
        raise bad("target_prompt_logprobs must have len(prompt) - 1 rows of token ids (or -1)")
    message = prompt_alt_tokens_problem(p.prompt_alt_tokens_k, len(p.prompt))
    if message is not None:
        raise bad(message)


def prompt_alt_tokens_problem(k: int, prompt_len: int) -> str | None:
    """Why `prompt_alt_tokens_k = k` cannot be served on a `prompt_len`-token prompt, or None. The gateway
    words its own refusal alike (same caps, from the contract)."""
    if not 0 <= k <= MAX_PROMPT_ALT_TOKENS_K:
        return f"prompt_alt_tokens_k must be between 0 and {MAX_PROMPT_ALT_TOKENS_K}, got {k}"
    cells = max(prompt_len - 1, 0) * k
    if cells > MAX_PROMPT_ALT_TOKEN_CELLS:
        return (f"prompt_alt_tokens_k asks for (len(prompt) - 1) * k = {prompt_len - 1} * {k} = {cells} draws; "
                f"at most {MAX_PROMPT_ALT_TOKEN_CELLS} per request: lower k or send a shorter prompt")
    return None
