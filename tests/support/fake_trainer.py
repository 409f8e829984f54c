"""A fake trainer pool speaking the internal pod API (tinkerkube_contract.pod_api), for gateway tests.

Run as a process exactly like the real trainer (`python -m tests.support.fake_trainer`, configured by
the same TINKERKUBE_TRAINER_* variables that `launch` writes), so the gateway's local backend starts,
health-checks and kills it for real. No torch: outputs are deterministic numbers of the right shapes.
Runs attach and detach (`PUT/DELETE /v1/runs/{id}`; a run named by the env attaches at boot); each
run's ops run strictly in seq order, waiting for gaps; a rejected op (bad body) still fills its seq
slot with a failure so the run moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyrage
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract import env, paths, pod_api
from tinkerkube_contract.pod_api import OpKind

E = os.environ
BOOT_MODEL_ID = E.get(env.MODEL_ID, "")
TOKEN = E.get(env.AUTH_TOKEN)
CKPT = Path(E.get(env.CHECKPOINT_DIR, "var/checkpoints"))
BOOT_ID = uuid.uuid4().hex
MAX_RUNS = int(E.get(env.PREFIX + "MAX_RUNS", "8"))
BROKEN_MODEL = "broken/model"  # a base model this fake trainer fails to load (exit code 3)
EXEC_DELAY = float(E.get("FAKE_TRAINER_OP_DELAY", "0"))
SAMPLE_DELAY = float(E.get("FAKE_TRAINER_SAMPLE_DELAY", "0"))  # a sample's result appears this much later
RECORD = E.get("FAKE_TRAINER_RECORD")  # a file: one JSON line per op PUT, in arrival order (ordering tests)


@dataclass
class _Run:
    spec: dict[str, Any]
    attach_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "ready"
    error: str | None = None
    ops: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    results: dict[int, tuple[str, str, bytes]] = field(default_factory=dict)  # seq → (state, type, body)
    snapshots: set[str] = field(default_factory=set)
    next: int = 1
    step: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return str(self.spec["model_id"])


runs: dict[str, _Run] = {}
samples: dict[str, tuple[str, str, bytes]] = {}
sampling: set[str] = set()  # accepted, result not there yet (SAMPLE_DELAY)


@contextlib.asynccontextmanager
async def _lifespan(_: FastAPI) -> Any:
    await _start()
    yield


app = FastAPI(lifespan=_lifespan)


def _auth(request: Request) -> Response | None:
    if TOKEN and request.headers.get(pod_api.HEADER_TOKEN) != TOKEN:
        return JSONResponse({"detail": "bad token", "code": "unauthorized", "category": "server"}, 401)
    return None


@app.get(pod_api.HEALTH_PATH)
@app.get(pod_api.READY_PATH)
async def ready() -> dict[str, bool]:
    return {"ok": True}


@app.get(pod_api.INFO_PATH)
async def info() -> dict[str, Any]:
    return {"base_model": E[env.BASE_MODEL], "world_size": 1, "ready": True, "boot_id": BOOT_ID,
            "max_runs": MAX_RUNS, "max_lora_rank": 128, "runs": sorted(runs)}


def _run_info(run: _Run) -> dict[str, Any]:
    return {"model_id": run.model_id, "base_model": run.spec["base_model"], "mode": run.spec.get("mode", "train"),
            "lora": run.spec.get("lora") or {}, "world_size": 1, "ready": run.state == "ready",
            "boot_id": run.attach_id, "last_completed_seq_id": run.next - 1, "state": run.state, "error": run.error,
            "restored_from": run.spec.get("restore_from")}


def _attach(spec: dict[str, Any]) -> _Run:
    run = _Run(spec)
    restore = spec.get("restore_from")
    if restore:
        if not paths.parse_tinker_path(restore).directory(CKPT).is_dir():
            run.state, run.error = "failed", f"cannot restore {restore}: no such checkpoint"
        run.snapshots.add(restore)
    if run.state == "ready":
        run.task = asyncio.get_running_loop().create_task(_runner(run))
    runs[run.model_id] = run
    return run


@app.put(pod_api.RUNS_PATH + "/{model_id:path}")
async def attach(model_id: str, request: Request) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    spec = json.loads(await request.body())
    run = runs.get(model_id)
    if run is None or run.state == "failed":
        if run is None and len(runs) >= MAX_RUNS:
            return JSONResponse({"detail": "pool full", "code": "pool_full", "category": "server"}, 429)
        run = _attach(spec)
    return JSONResponse(_run_info(run))


@app.get(pod_api.RUNS_PATH + "/{model_id:path}")
async def get_run(model_id: str, request: Request) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    run = runs.get(model_id)
    if run is None:
        return JSONResponse({"detail": f"no run {model_id}", "code": "unknown_model", "category": "user"}, 404)
    return JSONResponse(_run_info(run))


@app.delete(pod_api.RUNS_PATH + "/{model_id:path}")
async def detach(model_id: str, request: Request) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    run = runs.pop(model_id, None)
    if run is not None and run.task is not None:
        run.task.cancel()
    return JSONResponse({})


def _missing(model_id: str) -> Response:
    return JSONResponse({"detail": f"no run {model_id!r} is attached", "code": "unknown_model",
                         "category": "user"}, 404)


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _fwdbwd(run: _Run, body: bytes) -> bytes:
    req = pb.ForwardBackwardRequest()
    req.ParseFromString(body)
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(req.data))
    lp_data, loss_data, offsets = b"", b"", [0]
    total = 0.0
    for datum in req.data:
        n = sum(len(c.encoded_text.tokens) // 4 for c in datum.model_input)
        lps = [-1.0 - 0.01 * run.step] * n
        total += -sum(lps)
        lp_data += _f32(lps)
        loss_data += _f32([-v for v in lps])
        offsets.append(len(lp_data))
    off = struct.pack(f"<{len(offsets)}q", *offsets)
    record.fields["logprobs"].CopyFrom(pb.BatchedTensor(data=lp_data, offsets=off, dtype=pb.DTYPE_FLOAT32))
    record.fields["elementwise_loss"].CopyFrom(pb.BatchedTensor(data=loss_data, offsets=off, dtype=pb.DTYPE_FLOAT32))
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.loss_fn_outputs.append(record)
    out.metrics["loss:sum"] = total
    return out.SerializeToString()


def _save(run: _Run, kind: paths.CheckpointKind, name: str) -> dict[str, Any]:
    tp = paths.TinkerPath(run.model_id, kind, name)
    directory = tp.directory(CKPT)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"base_model": run.spec["base_model"], "seq_id": run.next, "lora": run.spec.get("lora") or {},
            "model_id": run.model_id}
    (directory / paths.METADATA_FILE).write_text(json.dumps(meta))
    run.snapshots.add(str(tp))
    return {"tinker_path": str(tp), "kind": kind.value, "size_bytes": 123}


def _export(run: _Run, name: str, recipients: list[str]) -> dict[str, Any]:
    """PEFT's two file names with deterministic stand-in bytes (`.age`-encrypted when asked), like the trainer."""
    tp = paths.TinkerPath(run.model_id, paths.CheckpointKind.EXTERNAL_WEIGHTS, name)
    directory = tp.directory(CKPT)
    directory.mkdir(parents=True, exist_ok=True)
    files = {paths.ADAPTER_CONFIG_FILE: json.dumps({"r": (run.spec.get("lora") or {}).get("rank", 32)}).encode(),
             paths.ADAPTER_WEIGHTS_FILE: f"weights of {run.model_id} at step {run.step}".encode()}
    keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    for file, content in files.items():
        if keys:
            (directory / (file + ".age")).write_bytes(pyrage.encrypt(content, keys))
        else:
            (directory / file).write_bytes(content)
    return {"tinker_path": str(tp), "kind": "external_weights",
            "size_bytes": sum(f.stat().st_size for f in directory.iterdir())}


def _execute(run: _Run, kind: str, body: bytes) -> tuple[str, str, bytes]:
    if kind == OpKind.FORWARD_BACKWARD:
        return "complete", pod_api.CONTENT_PROTOBUF, _fwdbwd(run, body)
    data = json.loads(body)
    if kind == OpKind.OPTIM_STEP:
        run.step += 1
        return "complete", pod_api.CONTENT_JSON, json.dumps({"metrics": {"step:max": run.step}}).encode()
    if kind == OpKind.SAVE_STATE:
        result = {"checkpoint": _save(run, paths.CheckpointKind.WEIGHTS, data["name"])}
    elif kind == OpKind.SAVE_SAMPLER_WEIGHTS:
        if data.get("name"):
            result = {"checkpoint": _save(run, paths.CheckpointKind.SAMPLER_WEIGHTS, data["name"])}
        else:
            run.snapshots.add(data["snapshot_id"])
            result = {"snapshot_id": data["snapshot_id"]}
    elif kind == OpKind.LOAD_STATE:
        result = {"path": data["path"]}
    elif kind == OpKind.SAVE_EXTERNAL_WEIGHTS:
        result = {"checkpoint": _export(run, data["name"], data.get("age_recipients") or [])}
    else:
        return "failed", pod_api.CONTENT_JSON, json.dumps({"error": f"unknown op {kind}", "category": "user"}).encode()
    return "complete", pod_api.CONTENT_JSON, json.dumps(result).encode()


async def _runner(run: _Run) -> None:
    while True:
        seq = run.next
        if seq in run.ops:
            kind, body = run.ops.pop(seq)
            if EXEC_DELAY:
                await asyncio.sleep(EXEC_DELAY)
            if seq not in run.results:
                run.results[seq] = _execute(run, kind, body)
            run.next = seq + 1
            run.changed.set()
            continue
        await run.changed.wait()
        run.changed.clear()


def _validate(kind: str, body: bytes) -> str | None:
    if kind == OpKind.FORWARD_BACKWARD:
        try:
            pb.ForwardBackwardRequest().ParseFromString(body)
        except Exception as exc:
            return f"bad protobuf: {exc}"
    return None


@app.put("/v1/models/{model_id}/ops/{seq_id}")
async def put_op(model_id: str, seq_id: int, request: Request) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    run = runs.get(model_id)
    if run is None or run.state != "ready":
        return _missing(model_id)
    kind = request.headers.get(pod_api.HEADER_OP, "")
    body = await request.body()
    if RECORD:
        text = body.decode(errors="replace") if kind != OpKind.FORWARD_BACKWARD else ""
        with open(RECORD, "a") as out:
            out.write(json.dumps({"model_id": model_id, "seq": seq_id, "op": kind, "body": text}) + "\n")
    if seq_id < run.next or seq_id in run.ops:
        return JSONResponse({"state": "accepted"})
    problem = _validate(kind, body)
    if problem:
        failed = json.dumps({"error": problem, "category": "user"}).encode()
        run.results[seq_id] = ("failed", pod_api.CONTENT_JSON, failed)
        run.ops[seq_id] = ("noop", b"{}")
        run.changed.set()
        return JSONResponse({"detail": problem, "code": "invalid_request", "category": "user"}, 400)
    run.ops[seq_id] = (kind, body)
    run.changed.set()
    return JSONResponse({"state": "accepted"})


async def _wait_for(lookup: Any, wait: float) -> Any:
    deadline = asyncio.get_running_loop().time() + wait
    while (found := lookup()) is None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(0.02, remaining))
    return found


def _answer(found: tuple[str, str, bytes] | None) -> Response:
    if found is None:
        return JSONResponse({"state": "pending"}, 202, headers={pod_api.HEADER_OP_STATE: "pending"})
    st, ctype, body = found
    timing = pod_api.OpTiming(wait_s=0.001, run_s=EXEC_DELAY).header()
    return Response(body, 200, media_type=ctype,
                    headers={pod_api.HEADER_OP_STATE: st, pod_api.HEADER_OP_TIMING: timing})


@app.get("/v1/models/{model_id}/ops/{seq_id}")
async def get_op(model_id: str, seq_id: int, request: Request, wait: float = 0.0) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    run = runs.get(model_id)
    if run is None:
        return _missing(model_id)
    return _answer(await _wait_for(lambda: run.results.get(seq_id), min(wait, 30.0)))


def _sample(op: dict[str, Any]) -> tuple[str, str, bytes]:
    req = op["request"]
    snapshot = op.get("snapshot_id")
    run = runs.get(op.get("model_id") or "")
    if op.get("model_id") and run is None:
        return "failed", pod_api.CONTENT_JSON, json.dumps({"error": f"no run {op['model_id']}",
                                                           "category": "user"}).encode()
    if snapshot and (run is None or snapshot not in run.snapshots):
        return "failed", pod_api.CONTENT_JSON, json.dumps({"error": f"unknown snapshot {snapshot}",
                                                           "category": "user"}).encode()
    prompt = [t for c in req["prompt"]["chunks"] for t in c.get("tokens", [])]
    max_tokens = int(req.get("sampling_params", {}).get("max_tokens") or 4)
    out = pb.SampleResponse()
    for _ in range(int(req.get("num_samples", 1))):
        toks = [(i % 7) + 3 for i in range(max_tokens)]
        out.sequences.append(pb.SampledSequence(stop_reason=pb.STOP_REASON_LENGTH,
                                                tokens=struct.pack(f"<{len(toks)}i", *toks),
                                                logprobs=_f32([-0.5] * len(toks))))
    if req.get("prompt_logprobs"):
        out.prompt_logprobs = _f32([math.nan] + [-2.0] * (len(prompt) - 1))
    return "complete", pod_api.CONTENT_PROTOBUF, out.SerializeToString()


@app.put("/v1/samples/{request_id}")
async def put_sample(request_id: str, request: Request) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    if request_id not in samples and request_id not in sampling:
        result = _sample(json.loads(await request.body()))
        if SAMPLE_DELAY:
            sampling.add(request_id)
            asyncio.get_running_loop().call_later(SAMPLE_DELAY, samples.__setitem__, request_id, result)
        else:
            samples[request_id] = result
    return JSONResponse({"state": "accepted"})


@app.get("/v1/samples/{request_id}")
async def get_sample(request_id: str, request: Request, wait: float = 0.0) -> Response:
    if (denied := _auth(request)) is not None:
        return denied
    return _answer(await _wait_for(lambda: samples.get(request_id), min(wait, 30.0)))


async def _start() -> None:
    if E[env.BASE_MODEL] == BROKEN_MODEL:
        print(f"cannot load {BROKEN_MODEL}: no such model", file=sys.stderr, flush=True)
        os._exit(3)
    if BOOT_MODEL_ID:
        run = _attach({"model_id": BOOT_MODEL_ID, "base_model": E[env.BASE_MODEL], "mode": E.get(env.MODE, "train"),
                       "lora": json.loads(E.get(env.LORA, "{}")), "restore_from": E.get(env.RESTORE_FROM)})
        if run.state == "failed":
            print(run.error, file=sys.stderr, flush=True)
            os._exit(3)


if __name__ == "__main__":
    uvicorn.run(app, host=E.get(env.HOST, "127.0.0.1"), port=int(E[env.PORT]), log_level="warning")
