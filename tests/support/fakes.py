"""Test doubles for the trainer runtime, plus builders for pod-API request bodies.

`FakeEngine` implements `engine_api.Engine` without a model: it records what ran, in which order,
and can be told to block, fail or crash by the op itself (a save_state whose `name` is a command),
so the same fake works in-process and inside real torchrun ranks
(`TINKERKUBE_TRAINER_ENGINE_FACTORY=tests.support.fakes:build_fake_engine`).

Commands (save_state `name`): `fail-user` (OpError on every rank), `crash` (RuntimeError on every
rank), `crash-rank-<r>` (RuntimeError on rank r only), `exit-rank-<r>` (rank r's process dies),
`sleep-<seconds>`. Anything else just runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_trainer.engine_api import (
    Collective,
    LocalCollective,
    OpError,
    OpOutput,
    PoolConfig,
    PoolOpKind,
    PreparedOp,
)

_JSON_OPS = {
    OpKind.OPTIM_STEP: api.OptimStepOp,
    OpKind.SAVE_STATE: api.SaveStateOp,
    OpKind.SAVE_SAMPLER_WEIGHTS: api.SaveSamplerWeightsOp,
    OpKind.LOAD_STATE: api.LoadStateOp,
    OpKind.SAMPLE: api.SampleOp,
}
KNOWN_LOSSES = frozenset({"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"})


class FakeEngine:
    def __init__(self, config: PoolConfig | None = None, collective: Collective | None = None, *,
                 last_completed_seq_id: int = 0, gate: threading.Event | None = None) -> None:
        self.config = config  # type: ignore[assignment]
        self.collective = collective or LocalCollective()
        self.last_completed_seq_id = last_completed_seq_id
        self.gate = gate  # when set, execute waits for it (tests holding the worker busy)
        self.executed: list[tuple[str, Any]] = []
        self.prepared: list[str] = []
        self.passes: list[list[str]] = []  # op kinds of each pass, in order
        self.runs: dict[str, api.RunSpec] = {}
        self.steps = 0
        self.grad_tokens = 0.0  # stand-in model state: tokens seen since the last optim_step

    # ---- engine_api.Engine ---------------------------------------------------------------------

    def prepare(self, model_id: str | None, kind: OpKind, body: bytes, content_type: str, *,
                seq_id: int | None = None) -> PreparedOp:
        self.prepared.append(str(kind))
        if kind is OpKind.FORWARD_BACKWARD:
            return PreparedOp(kind, _decode_fb(body), self._attached(model_id))
        model = _JSON_OPS.get(kind)
        if model is None:
            raise OpError(f"unsupported op {kind}", code="unsupported_op")
        try:
            payload = model.model_validate_json(body)
        except ValueError as exc:
            raise OpError(f"invalid {kind} body: {exc}", code="invalid_request") from exc
        if isinstance(payload, api.SampleOp):
            model_id = payload.model_id if payload.model_id is None else self._attached(payload.model_id)
        else:
            model_id = self._attached(model_id)
        return PreparedOp(kind, payload, model_id)

    def _attached(self, model_id: str | None) -> str:
        if model_id not in self.runs:
            raise OpError(f"no run {model_id!r} is attached", code="run_not_found")
        return str(model_id)

    def prepare_attach(self, spec: api.RunSpec) -> PreparedOp:
        return PreparedOp(PoolOpKind.ATTACH, spec, spec.model_id)

    def prepare_detach(self, model_id: str) -> PreparedOp:
        return PreparedOp(PoolOpKind.DETACH, None, model_id)

    def run_pass(self, ops: Sequence[PreparedOp]) -> list[OpOutput | OpError]:
        self.passes.append([str(op.kind) for op in ops])
        outcomes: list[OpOutput | OpError] = []
        for op in ops:
            try:
                outcomes.append(self.execute(op))
            except OpError as exc:
                outcomes.append(exc)
        return outcomes

    def run_samples(self, feed: Any) -> None:
        while taken := feed.poll():
            for key, op in taken:
                try:
                    feed.done(key, self.execute(op))
                except OpError as exc:
                    feed.done(key, exc)

    def execute(self, op: PreparedOp) -> OpOutput:
        if op.kind is PoolOpKind.ATTACH:
            self.runs[str(op.model_id)] = op.payload
            return _json(self.run_info(str(op.model_id)))
        if op.kind is PoolOpKind.DETACH:
            self.runs.pop(str(op.model_id), None)
            return _json({})
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise RuntimeError("FakeEngine gate never opened")
        if isinstance(op.payload, api.SaveStateOp):
            self._command(op.payload.name)
        if op.kind is OpKind.FORWARD_BACKWARD:
            out = self._forward_backward(op.payload)
        elif op.kind is OpKind.OPTIM_STEP:
            self.steps += 1
            out = _json({"metrics": {"step": float(self.steps), "grad_tokens": self.grad_tokens}})
            self.grad_tokens = 0.0
        elif op.kind is OpKind.SAMPLE:
            out = _sample_response(op.payload)
        else:
            out = _json({"kind": str(op.kind), "step": self.steps})
        self.executed.append((str(op.kind), _label(op.payload)))
        return out

    def info(self) -> dict[str, Any]:
        return {"vocab_size": 128, "tokenizer_dir": None}

    def run_info(self, model_id: str) -> dict[str, Any]:
        return {"last_completed_seq_id": self.last_completed_seq_id, "restored_from": None}

    # ---- internals -----------------------------------------------------------------------------

    def _command(self, name: str) -> None:
        rank = self.collective.rank
        if name == "fail-user":
            raise OpError("asked to fail", code="asked_to_fail")
        if name == "crash" or name == f"crash-rank-{rank}":
            raise RuntimeError(f"asked to crash on rank {rank}")
        if name == f"exit-rank-{rank}":
            os._exit(3)
        if name.startswith("sleep-"):
            time.sleep(float(name.removeprefix("sleep-")))

    def _forward_backward(self, payload: dict[str, Any]) -> OpOutput:
        import torch

        lengths: list[int] = payload["lengths"]
        world, rank = self.collective.world_size, self.collective.rank
        mine = sum(n for i, n in enumerate(lengths) if i % world == rank)
        total = torch.tensor([float(mine)])
        self.collective.all_reduce_sum_([total])
        if not payload["forward_only"]:
            self.grad_tokens += float(total.item())
        return OpOutput(api.CONTENT_PROTOBUF, _fb_output(lengths, float(total.item())))


def build_fake_engine(config: PoolConfig, collective: Collective) -> FakeEngine:
    """The engine factory torchrun ranks use in runtime tests (no model, starts in milliseconds)."""
    return FakeEngine(config, collective)


def _label(payload: Any) -> Any:
    if isinstance(payload, api.SaveStateOp):
        return payload.name
    if isinstance(payload, dict):
        return payload.get("tag")
    return None


def _json(obj: Any) -> OpOutput:
    return OpOutput(api.CONTENT_JSON, json.dumps(obj).encode())


def _decode_fb(body: bytes) -> dict[str, Any]:
    import numpy as np
    from google.protobuf.message import DecodeError
    from tinker.proto import tinker_public_pb2 as pb

    try:
        req = pb.ForwardBackwardRequest.FromString(body)
    except DecodeError as exc:
        raise OpError(f"malformed ForwardBackwardRequest protobuf: {exc}", code="invalid_protobuf") from exc
    if req.loss_fn not in KNOWN_LOSSES:
        raise OpError(f"unknown loss_fn {req.loss_fn!r}", code="unknown_loss")
    if not req.data:
        raise OpError("forward_backward needs at least one datum", code="invalid_request")
    lengths = []
    for datum in req.data:
        n = sum(len(np.frombuffer(c.encoded_text.tokens, dtype="<i4")) for c in datum.model_input)
        lengths.append(n)
    return {"lengths": lengths, "forward_only": req.forward_only, "tag": req.loss_fn}


def _fb_output(lengths: Sequence[int], total_tokens: float) -> bytes:
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.metrics["loss:sum"] = total_tokens
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(lengths))
    field = record.fields["logprobs"]
    field.data = np.zeros(sum(lengths), dtype="<f4").tobytes()
    field.offsets = np.cumsum([0, *[n * 4 for n in lengths]]).astype("<i8").tobytes()
    field.dtype = pb.DTYPE_FLOAT32
    return out.SerializeToString()


def _sample_response(op: api.SampleOp) -> OpOutput:
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    n = int(op.request.get("num_samples", 1))
    max_tokens = int((op.request.get("sampling_params") or {}).get("max_tokens") or 4)
    resp = pb.SampleResponse()
    for _ in range(n):
        resp.sequences.add(stop_reason=pb.STOP_REASON_LENGTH, tokens=np.arange(max_tokens, dtype="<i4").tobytes(),
                           logprobs=np.zeros(max_tokens, dtype="<f4").tobytes())
    return OpOutput(api.CONTENT_PROTOBUF, resp.SerializeToString())


# ---- request builders (shared by the trainer, gateway and bench tests) ----------------------------


def forward_backward_body(token_lists: Sequence[Sequence[int]], *, model_id: str = "m", seq_id: int = 0,
                          loss_fn: str = "cross_entropy", forward_only: bool = False,
                          weights: Sequence[Sequence[float]] | None = None) -> bytes:
    """The SDK's own protobuf for a cross-entropy batch: input = tokens[:-1], targets = tokens[1:]."""
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    data = []
    for i, tokens in enumerate(token_lists):
        inputs, targets = list(tokens[:-1]), list(tokens[1:])
        w = list(weights[i]) if weights is not None else [1.0] * len(targets)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(inputs),
                                loss_fn_inputs={"target_tokens": targets, "weights": w}))
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),  # type: ignore[arg-type]
        model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def json_body(model: Any) -> bytes:
    return model.model_dump_json().encode()


# ---- an in-process trainer app over a FakeEngine (component tests) --------------------------------

MODEL_ID = "sess-test:train:0"
TOKEN = "test-token"


class FakeTrainer:
    """The real app and runtime over a FakeEngine, reached through httpx.ASGITransport."""

    def __init__(self, client: Any, engine: FakeEngine, runtime: Any) -> None:
        self.client = client
        self.engine = engine
        self.runtime = runtime

    async def put_op(self, seq_id: int, kind: OpKind, body: bytes, **headers: str) -> Any:
        content_type = api.CONTENT_PROTOBUF if kind is OpKind.FORWARD_BACKWARD else api.CONTENT_JSON
        return await self.client.put(api.op_path(MODEL_ID, seq_id), content=body,
                                     headers={api.HEADER_OP: str(kind), "content-type": content_type, **headers})

    async def get_op(self, seq_id: int, wait: float = 0.0) -> Any:
        return await self.client.get(api.op_path(MODEL_ID, seq_id), params={"wait": wait})

    async def put_sample(self, request_id: str, op: api.SampleOp) -> Any:
        return await self.client.put(api.sample_path(request_id), content=json_body(op),
                                     headers={api.HEADER_OP: "sample", "content-type": api.CONTENT_JSON})

    async def get_sample(self, request_id: str, wait: float = 0.0) -> Any:
        return await self.client.get(api.sample_path(request_id), params={"wait": wait})


def fake_trainer(*, token: str | None = TOKEN, gate: threading.Event | None = None, last_completed_seq_id: int = 0,
                 **options: Any) -> Any:
    """`async with fake_trainer() as t:` — a ready runtime, its app, and a client carrying the token."""
    import contextlib

    import httpx

    from tinkerkube_trainer.http_api import create_app
    from tinkerkube_trainer.scheduler import Limits
    from tinkerkube_trainer.server import RuntimeOptions, TrainerRuntime

    @contextlib.asynccontextmanager
    async def run() -> Any:
        engine = FakeEngine(last_completed_seq_id=last_completed_seq_id, gate=gate)
        limits = {k: options.pop(k) for k in ("ttl", "max_retained", "max_runs", "max_pass_tokens",
                                              "max_sample_rows") if k in options}
        boot_run = api.RunSpec(model_id=MODEL_ID, base_model="fake/base")
        runtime = TrainerRuntime.for_engine(engine, RuntimeOptions(base_model="fake/base", boot_run=boot_run,
                                                                   token=token, limits=Limits(**limits), **options))
        app = create_app(runtime)
        headers = {api.HEADER_TOKEN: token} if token else {}
        async with runtime.running():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://trainer", headers=headers,
                                         timeout=60) as client:
                yield FakeTrainer(client, engine, runtime)

    return run()
