"""Sampled tokens + their decoded text → what the compatible APIs return: pure functions, no I/O.

Stops: the Tinker sampler ends a sequence at the first occurrence of a stop string and keeps the string
(Tinker semantics); OpenAI and Anthropic return the text before it. EOS is a sampled token too; decoding
skips special tokens, so it never shows in the text. Which tokens a choice reports (logprobs, stream
chunks) follows the text: a token is kept while it starts inside the returned text, judged by the
lengths of the tokens' own decoded pieces (streams cut their chunks at those starts: compat.increments).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tinkerkube_contract.pod_api import DecodedText
from tinkerkube_gateway.compat.values import Generation, Sampled, TopList

NO_LOGPROB = -9999.0  # what OpenAI reports for a logprob too small for a float (JSON has no -inf)


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NO_LOGPROB


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token: str  # the token's own decoded text
    logprob: float | None  # None: the first prompt token (nothing precedes it)
    top: tuple[tuple[str, float], ...]
    offset: int  # where the token starts in the returned text


@dataclass(frozen=True, slots=True)
class Choice:
    text: str
    finish_reason: str  # "stop" | "length"
    stop_sequence: str | None  # the stop string that ended it (Anthropic's stop_sequence)
    tokens: tuple[TokenInfo, ...]  # the kept tokens
    completion_tokens: int  # every sampled token, the stop token included


def top_ids(generation: Generation) -> list[int]:
    """Every token id named in a top-logprobs table (their texts are decoded in the same call)."""
    rows: list[TopList] = [row for seq in generation.sequences for row in seq.top or []]
    rows += generation.prompt_top or []
    return sorted({tid for row in rows for tid, _ in row})


def _cut(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    best, matched = len(text), None
    for stop in stops:
        at = text.find(stop) if stop else -1
        if 0 <= at < best:
            best, matched = at, stop
    return text[:best], matched


def _spans(text: str, decoded: DecodedText, count: int) -> list[int]:
    """Start offsets of the tokens kept for `text` (see the module docstring)."""
    if not text:
        return []
    pieces = decoded.pieces or [""] * count
    special = decoded.special or [False] * count
    starts, at = [], 0
    for i in range(count):
        if at >= len(text):
            break
        starts.append(at)
        at += 0 if special[i] else len(pieces[i])
    return starts


def _tops(row: TopList | None, names: Mapping[int, str]) -> tuple[tuple[str, float], ...]:
    return tuple((names.get(tid, ""), finite(lp)) for tid, lp in row or ())


def choice(seq: Sampled, decoded: DecodedText, stops: Sequence[str], names: Mapping[int, str]) -> Choice:
    """One sampled sequence as a choice; `names`: token id → text for the top-logprob tables."""
    text, matched = _cut(decoded.text, stops)
    starts = _spans(text, decoded, len(seq.tokens))
    pieces = decoded.pieces or [""] * len(seq.tokens)
    tokens = tuple(TokenInfo(pieces[i], finite(seq.logprobs[i]) if i < len(seq.logprobs) else None,
                             _tops(seq.top[i] if seq.top and i < len(seq.top) else None, names), start)
                   for i, start in enumerate(starts))
    finish = "stop" if seq.stopped or matched is not None else "length"
    return Choice(text, finish, matched, tokens, len(seq.tokens))


def prompt_tokens(generation: Generation, decoded: DecodedText, names: Mapping[int, str]) -> tuple[TokenInfo, ...]:
    """The prompt's tokens with their logprobs (`echo`): every token, offsets in the prompt's text."""
    pieces = decoded.pieces or [""] * len(generation.prompt)
    special = decoded.special or [False] * len(generation.prompt)
    lps = generation.prompt_logprobs or [None] * len(generation.prompt)
    out, at = [], 0
    for i, piece in enumerate(pieces):
        lp = lps[i] if i < len(lps) else None
        top = generation.prompt_top[i] if generation.prompt_top and i < len(generation.prompt_top) and i else None
        out.append(TokenInfo(piece, None if lp is None else finite(lp), _tops(top, names),
                             min(at, len(decoded.text))))
        at += 0 if special[i] else len(piece)
    return tuple(out)
