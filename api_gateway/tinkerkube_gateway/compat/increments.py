"""What of a growing choice a stream may send now: pure functions over shaped choices, no I/O.

A streamed choice is shaped (`shaping.choice`) from every token decoded so far, each time its sample grows,
and only its stable text goes out:
- text that ends in an incomplete character (a multi-byte character whose bytes are split over tokens
  decodes to U+FFFD until its last byte arrives) waits for the next token;
- text that could be the start of a stop string waits until it is known not to be one (a stop string split
  over tokens never shows, not even its first letters); once a stop string is found the text before it is
  final;
- the end of a choice sends what is left of the final choice, shaped exactly as without streaming, so the
  joined deltas are the non-streamed text.
Each delta is cut at its tokens' starts: one piece per token (its logprob entry rides with it), as OpenAI
streams one chunk per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from tinkerkube_gateway.compat.shaping import Choice, TokenInfo

log = logging.getLogger(__name__)
INCOMPLETE = "\ufffd"  # what decoding gives for a character whose bytes have not all been sampled yet


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    token: TokenInfo | None  # the token starting this piece (None: the rest of an earlier token's text)


@dataclass(frozen=True, slots=True)
class Delta:
    index: int  # the choice's index in the response
    pieces: tuple[Piece, ...]
    final: Choice | None = None  # set on a choice's last delta: the whole choice (finish reason, stop, usage)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could begin a stop string (the longest such suffix)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def stable_text(partial: Choice, stops: Sequence[str]) -> str:
    """The part of a still-growing choice's text that no later token can change."""
    if partial.stop_sequence is not None:
        return partial.text  # cut before a stop string: the sample ends there
    text = partial.text.rstrip(INCOMPLETE)
    return text[: len(text) - held_back(text, stops)]


def pieces(text: str, start: int, tokens: Sequence[TokenInfo]) -> tuple[Piece, ...]:
    """`text[start:]` cut at `tokens`' starts, in order (a token said to start before `start`, when an
    incomplete character shifted its offset, starts there)."""
    inside = [t for t in tokens if t.offset < len(text)]
    bounds = [max(start, t.offset) for t in inside]
    out = []
    if not bounds or bounds[0] > start:  # the rest of a token sent earlier
        out.append(Piece(text[start:bounds[0] if bounds else len(text)], None))
    ends = [*bounds[1:], len(text)] if bounds else []
    out += [Piece(text[a:b], t) for t, a, b in zip(inside, bounds, ends, strict=True)]
    return tuple(p for p in out if p.text or p.token is not None)


@dataclass(slots=True)
class _Sent:
    text: str = ""
    tokens: int = 0  # kept tokens sent (their logprob entries)
    done: bool = False


@dataclass(slots=True)
class ChoiceStreams:
    """The choices of one sample request, numbered from `first_index`, as they grow."""

    stops: tuple[str, ...]
    first_index: int = 0
    _sent: dict[int, _Sent] = field(default_factory=dict)

    def grow(self, choices: Sequence[Choice]) -> list[Delta]:
        """Deltas for choices shaped from every token so far (the sample still runs)."""
        out = []
        for i, c in enumerate(choices):
            sent = self._sent.setdefault(i, _Sent())
            text = stable_text(c, self.stops)
            if sent.done or len(text) <= len(sent.text) or not text.startswith(sent.text):
                continue
            new = [t for t in c.tokens[sent.tokens:] if t.offset < len(text)]
            out.append(Delta(self.first_index + i, pieces(text, len(sent.text), new)))
            sent.text, sent.tokens = text, sent.tokens + len(new)
        return out

    def end(self, choices: Sequence[Choice]) -> list[Delta]:
        """The last delta of every choice, from the finished sample shaped as without streaming."""
        out = []
        for i, c in enumerate(choices):
            sent = self._sent.setdefault(i, _Sent())
            if not c.text.startswith(sent.text):  # cannot happen with a prefix-stable tokenizer: say so
                log.warning("a streamed choice sent %r, which does not begin its final text %r", sent.text, c.text)
            start = len(sent.text) if c.text.startswith(sent.text) else len(c.text)
            out.append(Delta(self.first_index + i, pieces(c.text, start, c.tokens[sent.tokens:]), c))
            sent.text, sent.tokens, sent.done = c.text, len(c.tokens), True
        return out
