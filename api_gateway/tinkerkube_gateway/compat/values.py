"""Typed values passed between the compatible APIs' modules: what is asked of a sampler, what it returned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """What the compatible APIs ask of a sampler (already bounded by compat.schemas)."""

    n: int = 1
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    prompt_logprobs: bool = False


TopList = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class Sampled:
    tokens: list[int]
    logprobs: list[float]
    top: list[TopList] | None  # per token, when top logprobs were asked for
    stopped: bool  # a stop string, a stop token or EOS ended it (else max_tokens)


@dataclass(frozen=True, slots=True)
class Generation:
    prompt: list[int]
    sequences: list[Sampled]
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[TopList] | None = None
