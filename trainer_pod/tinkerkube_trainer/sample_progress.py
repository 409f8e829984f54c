"""A running sample's tokens so far, for the streaming read of the pod API (`SampleProgress`).

Why shared lists instead of copies: the decoder appends each step's token, logprob and top-k row to its
job's lists; handing the decoder these very lists makes progress free on the decode thread (no copy, no
lock). Only the op thread appends; the event loop reads slices, which is safe under the GIL because a
list only ever grows. The object lives while the sample runs: the scheduler drops it when the sample
finishes (the result holds everything then), so progress is bounded by the running samples' max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinkerkube_contract.pod_api import OpState, SampleProgress, SequenceProgress

TopRow = tuple[np.ndarray, np.ndarray]  # a step's top-k (ids, logprobs)


@dataclass(eq=False)
class Progress:
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    topk: list[list[TopRow]] = field(default_factory=list)
    published: int = 0  # steps fully recorded (tokens, logprobs and top-k rows): what readers may see
    cancelled: bool = False  # set on the event loop; the decoder ends the sample's rows at its next step
    stoppable: bool = True  # False where ranks decode in lockstep (a sharded base): one rank must not stop alone

    def bind(self, samples: int) -> None:
        """Called by the decoder when the sample starts: one list per sequence."""
        self.tokens[:] = [[] for _ in range(samples)]
        self.logprobs[:] = [[] for _ in range(samples)]
        self.topk[:] = [[] for _ in range(samples)]

    @property
    def stop_now(self) -> bool:
        return self.cancelled and self.stoppable

    def publish(self) -> None:
        """Called by the decoder once a step is fully recorded (so a reader never sees half a step)."""
        self.published = max((len(t) for t in self.tokens), default=0)

    def read(self, after: int) -> SampleProgress:
        """Every sequence's tokens past `after` (pending: the sample still runs)."""
        count = self.published
        seqs = []
        for s in range(len(self.tokens)):
            end = min(len(self.tokens[s]), count)  # past `count`: a step still being recorded
            top = None
            if self.topk[s]:
                top = [list(zip(ids.tolist(), lps.tolist(), strict=True)) for ids, lps in self.topk[s][after:end]]
            seqs.append(SequenceProgress(tokens=self.tokens[s][after:end], logprobs=self.logprobs[s][after:end],
                                         top=top))
        return SampleProgress(state=OpState.PENDING, next=max(after, count), sequences=seqs)
