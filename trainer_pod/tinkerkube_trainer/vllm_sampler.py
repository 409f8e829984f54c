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
  `stop=[]` never (ignore_eos); `max_tokens=0` returns empty samples (prompt scores only).
Not served: `target_prompt_ids` (vLLM cannot score arbitrary ids): a clear user error.
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
from tinkerkube_trainer.sampling import make_result, shape_prompt_scores, stop_token_set
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
    params: SampleParams
    adapter: AdapterRef | None  # None: the base model


def _token_id(key: str) -> int:
    """`return_tokens_as_token_ids` names tokens `token_id:123`; prompt logprob dicts use `123`."""
    return int(key.rsplit(":", 1)[-1])


def request_body(params: SampleParams, model: str, eos_ids: Sequence[int]) -> dict[str, Any]:
    """The /v1/completions body of one sample request (prompt as token ids)."""
    if params.target_prompt_ids is not None:
        raise OpError("target_prompt_ids is not supported by this pool's vLLM sampler; ask for prompt logprobs "
                      "(or top-k prompt logprobs) instead", code="unsupported_by_sampler")
    stops = sorted(stop_token_set(params, eos_ids))  # empty: stop=[], never stop (not even at EOS)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(params.prompt),
        "n": 1 if params.max_tokens == 0 else params.num_samples,
        "max_tokens": max(1, params.max_tokens),
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
    k = params.topk_prompt_logprobs
    if params.prompt_logprobs or k:
        body["prompt_logprobs"] = k
    return body


def _prompt_scores(params: SampleParams, entries: Sequence[Mapping[str, Any] | None]) -> dict[str, np.ndarray]:
    p, k = len(params.prompt), params.topk_prompt_logprobs
    rows = [entries[i] or {} for i in range(1, p)]
    picked = np.array([rows[i - 1][str(params.prompt[i])]["logprob"] for i in range(1, p)], dtype=np.float32) \
        if params.prompt_logprobs else None
    top_ids = top_vals = None
    if k:
        top_ids, top_vals = np.zeros((p - 1, k), np.int32), np.zeros((p - 1, k), np.float32)
        for i, row in enumerate(rows):
            best = sorted(((v["rank"], int(t), v["logprob"]) for t, v in row.items() if v["rank"] <= k))[:k]
            top_ids[i], top_vals[i] = [b[1] for b in best], [b[2] for b in best]
    return shape_prompt_scores(params, p, picked, top_ids, top_vals)


def parse_response(params: SampleParams, answer: Mapping[str, Any]) -> SampleResult:
    """vLLM's completion answer → our SampleResult (through the shared `make_result`)."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    scores = _prompt_scores(params, choices[0].get("prompt_logprobs") or []) \
        if params.prompt_logprobs or params.topk_prompt_logprobs else {}
    if params.max_tokens == 0:
        n = params.num_samples
        return make_result([[] for _ in range(n)], [[] for _ in range(n)], [False] * n, [[] for _ in range(n)],
                           params.topk_sample_logprobs, scores)
    k = params.topk_sample_logprobs
    tokens, logprobs, stopped, topk = [], [], [], []
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
        body = request_body(job.params, self.adapter_name(job.adapter), self.eos_ids)
        return parse_response(job.params, self.server.post("/v1/completions", body))

    def _serve(self, key: Key, job: VllmJob, on_done: Callable[[Key, SampleResult | OpError], None]) -> None:
        try:
            outcome: SampleResult | OpError = self.sample(job)
        except OpError as exc:
            outcome = exc
        except VllmError as exc:
            user = 400 <= exc.status < 500 and exc.status not in (404, 408, 429)
            outcome = OpError(str(exc), code="sampler_rejected" if user else "sampler_failed",
                              category=ErrorCategory.USER if user else ErrorCategory.SERVER)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not sink the others
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
