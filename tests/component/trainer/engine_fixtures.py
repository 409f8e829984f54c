"""Shared helpers for the engine tests: a tiny-model pool with one run, SDK-encoded requests, a 2-rank
stand-in.

Requests are built with the real SDK types and encoder and results decoded with the SDK's own
decoder, so these tests exercise exactly the bytes the gateway forwards. `SingleRun` is a pool
engine with one attached run, driven one op per pass (the co-batching tests drive the pool itself).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind, RunSpec, SampleOp
from tinkerkube_contract.resource import LoraSpec, SessionMode
from tinkerkube_trainer.engine import build_engine
from tinkerkube_trainer.engine_api import Collective, LocalCollective, OpError, OpOutput, PoolConfig, PreparedOp
from tinkerkube_trainer.multilora import peft_state_dict
from tinkerkube_trainer.runs import Run

torch.set_num_threads(1)  # tiny matrices: more threads only add contention on shared cores
MODEL_ID = "sess-test:train:0"
LORA = LoraSpec(rank=4, alpha=8.0, seed=7)


@dataclass(frozen=True)
class RunConfig:
    pool: PoolConfig
    run: RunSpec

    @property
    def checkpoint_dir(self) -> Path:
        return self.pool.checkpoint_dir


def engine_config(tmp_path: Path, cache_dir: Path, **overrides: Any) -> RunConfig:
    run_fields = ("model_id", "mode", "lora", "restore_from", "restore_optimizer")
    fields: dict[str, Any] = dict(model_id=MODEL_ID, base_model=TINY_QWEN3, mode=SessionMode.TRAIN, lora=LORA,
                                  checkpoint_dir=tmp_path / "ckpt", model_cache_dir=cache_dir, device="cpu")
    fields.update(overrides)
    run = RunSpec(base_model=fields["base_model"], **{k: fields.pop(k) for k in run_fields if k in fields})
    return RunConfig(PoolConfig(**fields), run)


class SingleRun:
    """A pool engine with one attached run, looked at as that run (one op per pass)."""

    def __init__(self, config: RunConfig, collective: Collective) -> None:
        self.config = config
        self.pool = build_engine(config.pool, collective)
        self.model_id = config.run.model_id
        self.execute(self.pool.prepare_attach(config.run))

    @property
    def run(self) -> Run:
        return self.pool.runs[self.model_id]

    @property
    def tokenizer(self) -> Any:
        return self.pool.tokenizer

    @property
    def eos_ids(self) -> list[int]:
        return self.pool.eos_ids

    @property
    def optimizer(self) -> Any:
        return self.run.optimizer

    def info(self) -> dict[str, Any]:
        return {**self.pool.info(), **self.pool.run_info(self.model_id)}

    def prepare(self, kind: OpKind, body: bytes, content_type: str, *, seq_id: int | None = None) -> PreparedOp:
        return self.pool.prepare(self.model_id, kind, body, content_type, seq_id=seq_id)

    def execute(self, op: PreparedOp) -> OpOutput:
        outcome = self.pool.run_pass([op])[0]
        if isinstance(outcome, OpError):
            raise outcome
        return outcome

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """Copies of the run's adapter tensors by peft key."""
        return {} if self.run.weights is None else peft_state_dict(self.run.weights)

    def accumulated_grads(self) -> dict[str, torch.Tensor]:
        """Copies of the gradients summed since the last optim_step (empty when there are none)."""
        if self.run.acc is None or self.run.weights is None:
            return {}
        names = list(peft_state_dict(self.run.weights))
        return {n: g.clone() for n, g in zip(names, self.run.acc, strict=True)}


def new_engine(config: RunConfig, collective: Collective | None = None) -> SingleRun:
    return SingleRun(config, collective or LocalCollective())


def ce_datums(n: int, seed: int = 0, vocab: int = 500) -> list[types.Datum]:
    """Random sequences of different lengths with real-valued weights."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(3, vocab, size=int(rng.integers(4, 12))).tolist()
        weights = rng.uniform(0.2, 1.5, size=len(seq) - 1).astype(np.float32).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                               loss_fn_inputs={"target_tokens": seq[1:], "weights": weights}))
    return out


def rl_datums(n: int, seed: int = 0) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for d in ce_datums(n, seed):
        k = d.model_input.length
        out.append(types.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "logprobs": (-6.2 + rng.normal(0, 0.05, size=k)).astype(np.float32).tolist(),
            "advantages": rng.normal(0, 1, size=k).astype(np.float32).tolist(),
        }))
    return out


def fb_body(data: list[types.Datum], loss_fn: str = "cross_entropy", *, forward_only: bool = False,
            config: dict[str, float] | None = None) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=MODEL_ID, seq_id=1)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def prepare_fb(engine: SingleRun, data: list[types.Datum], loss_fn: str = "cross_entropy", **kw: Any):
    return engine.prepare(OpKind.FORWARD_BACKWARD, fb_body(data, loss_fn, **kw), CONTENT_PROTOBUF)


def run_fb(engine: SingleRun, data: list[types.Datum], loss_fn: str = "cross_entropy", **kw: Any):
    return deserialize_forward_backward_output(engine.execute(prepare_fb(engine, data, loss_fn, **kw)).body)


def prepare_json(engine: SingleRun, kind: OpKind, payload: dict[str, Any], **kw: Any) -> PreparedOp:
    return engine.prepare(kind, json.dumps(payload).encode(), CONTENT_JSON, **kw)


def run_json(engine: SingleRun, kind: OpKind, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = engine.execute(prepare_json(engine, kind, payload, **kw))
    assert out.content_type == CONTENT_JSON
    return json.loads(out.body)


def optim_step(engine: SingleRun, lr: float = 0.05, **adam: float) -> dict[str, Any]:
    return run_json(engine, OpKind.OPTIM_STEP, {"adam_params": {"learning_rate": lr, **adam}})


def sample_request(prompt: list[int], *, num_samples: int = 1, **params: Any) -> dict[str, Any]:
    flag_names = ("prompt_logprobs", "topk_prompt_logprobs", "prompt_logprobs_last_n", "topk_sample_logprobs",
                  "target_prompt_logprobs", "prompt_alt_tokens_k")
    flags = {k: params.pop(k) for k in flag_names if k in params}
    req = types.SampleRequest(prompt=types.ModelInput.from_ints(prompt), num_samples=num_samples,
                              sampling_params=types.SamplingParams(**params), **flags)
    return req.model_dump(mode="json", exclude_none=True)


def prepare_sample(engine: SingleRun, prompt: list[int], snapshot_id: str | None = None, **kw: Any):
    body = SampleOp(request=sample_request(prompt, **kw), model_id=engine.model_id,
                    snapshot_id=snapshot_id).model_dump_json().encode()
    return engine.prepare(OpKind.SAMPLE, body, CONTENT_JSON)


def run_sample(engine: SingleRun, prompt: list[int], snapshot_id: str | None = None, **kw: Any):
    return deserialize_sample_response(engine.execute(prepare_sample(engine, prompt, snapshot_id, **kw)).body)


def sequence_logprobs(engine: SingleRun, tokens: list[int]) -> np.ndarray:
    """The model's own logprob of tokens[1:] given the prefix (a forward, which changes nothing)."""
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:]})
    return np.asarray(run_fb(engine, [datum], forward_only=True).loss_fn_outputs[0]["logprobs"].data)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


class ThreadGroup:
    """In-process stand-in for torch.distributed: ranks are threads meeting at a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world

    def _exchange(self, item: Any) -> list[Any]:
        self.group.slots[self.rank] = item
        self.group.barrier.wait()
        seen = list(self.group.slots)
        self.group.barrier.wait()
        return seen

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        every = self._exchange([t.detach().clone() for t in tensors])
        for i, t in enumerate(tensors):
            t.copy_(sum(rank_tensors[i] for rank_tensors in every))

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._exchange(obj)


def run_ranks(engines: list[SingleRun], ops: list[PreparedOp]) -> list[Any]:
    """Execute one prepared op on every rank at once (as torchrun's ranks would)."""
    with ThreadPoolExecutor(len(engines)) as pool:
        return list(pool.map(lambda pair: pair[0].execute(pair[1]), zip(engines, ops, strict=True)))
