"""A server with nothing in it, in front of the gateway: the SDK's floor, and with `--compute` its ceiling.

    (started by bench/op_overhead.py; a helper, not a benchmark: `make bench` skips bench/_*.py)
    .venv/bin/python bench/_sdk_floor.py --serve PORT --upstream URL                      # the floor
    .venv/bin/python bench/_sdk_floor.py --serve PORT --upstream URL --compute MODEL_DIR  # the ideal server

A raw ASGI app on the gateway's HTTP stack (uvicorn, uvloop, httptools) in a process of its own. Every request
passes through to the real gateway (`--upstream`), so an SDK client made through it sets itself up for real,
until an op kind (forward, forward_backward, optim_step) has answered once with a finished result. From then on
this server takes that kind's ops itself: each gets a request id of its own, and its `retrieve_future` answers
with the recorded result's bytes
- at once (the floor): no store, no trainer, no framework, no math. No server answers the SDK faster here, so
  the per-op latency goal is read against this p50;
- once the op's math has run (`--compute`, the ideal server): the benchmark's bare transformers + peft loop
  split into its ops (forward_backward, optim_step, a forward-only forward), on one worker thread in this
  process, in arrival order, as a trainer runs them. A server that adds nothing to the math but one thread
  hand-off: its ratios over the bare loop are the ceiling of what a server reaches with this SDK on this
  machine (the SDK's own CPU and latency included, on the same cores as the math).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

KINDS = ("forward", "forward_backward", "optim_step")
RETRIEVE_ROUTE = "/api/v1/retrieve_future"
_HOP_HEADERS = {b"host", b"content-length", b"transfer-encoding", b"connection"}

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def op_kind(path: str, body: bytes) -> str | None:
    """The op a POST submits (the SDK's forward is a forward_backward marked forward_only), None: not an op."""
    if path == "/api/v1/optim_step":
        return "optim_step"
    if path == "/api/v1/forward":
        return "forward"
    if path != "/api/v1/forward_backward":
        return None
    from google.protobuf.message import DecodeError
    from tinker.proto import tinker_public_pb2 as public_pb

    try:
        return "forward" if public_pb.ForwardBackwardRequest.FromString(body).forward_only else "forward_backward"
    except DecodeError:
        return None  # not the SDK's protobuf: passed through


def _request_id(body: bytes) -> str | None:
    try:
        found = json.loads(body).get("request_id")
    except (ValueError, AttributeError):
        return None  # a protobuf body (a result, or an op)
    return found if isinstance(found, str) else None


def _final(answer: Answer) -> bool:
    """A retrieve's answer that is the op's result (not a try-again after the long-poll)."""
    status, _, body = answer
    if status != 200:
        return False
    try:
        return json.loads(body).get("type") != "try_again"
    except (ValueError, AttributeError):
        return True  # protobuf: a result


@dataclass
class Recorded:
    accepted: Answer | None = None  # the op POST's answer (its request id replaced for every op taken)
    result: Answer | None = None  # the retrieve's answer with the finished result


class BareMath:
    """The bare loop's math, op by op (bench/gateway_overhead.BarePeft), for the ideal server's worker."""

    def __init__(self, model_dir: Path, rank: int, fb_shape: tuple[int, int], forward_shape: tuple[int, int],
                 threads: int) -> None:
        import torch
        from gateway_overhead import BarePeft, make_batch

        from tinkerkube_contract.resource import LoraSpec

        torch.set_num_threads(threads)
        sys.setswitchinterval(0.0005)  # as the trainer: the math thread must not hold the event loop for 5 ms
        self.bare = BarePeft(model_dir, LoraSpec(rank=rank, alpha=float(rank)))
        self.batches = {"forward_backward": self.bare.tensors(make_batch(400, *fb_shape, seed=1)),
                        "forward": self.bare.tensors(make_batch(400, *forward_shape, seed=5))}

    def run(self, kind: str) -> None:
        if kind == "optim_step":
            self.bare.optim()
        elif kind == "forward":
            self.bare.forward(self.batches["forward"])
        else:
            self.bare.fb(self.batches["forward_backward"])


class FloorApp:
    def __init__(self, upstream: str, math: BareMath | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(120.0, connect=5.0))
        self.recorded = {kind: Recorded() for kind in KINDS}
        self.recording: dict[str, str] = {}  # the gateway's request id of a kind's first op -> its kind
        self.ops: dict[str, tuple[str, asyncio.Future[None] | None]] = {}  # ops taken here: kind, math done
        self.ids = itertools.count(1)
        self.math = math
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="math") if math is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        if path == "/__floor":
            status = {"recorded": [k for k, r in self.recorded.items() if r.result is not None], "taken": len(self.ops)}
            await _reply(send, 200, [(b"content-type", b"application/json")], json.dumps(status).encode())
            return
        kind = op_kind(path, body) if scope["method"] == "POST" else None
        if kind is not None and self.recorded[kind].result is not None:
            await self._take(kind, send)
            return
        taken = self.ops.get(_request_id(body) or "") if path == RETRIEVE_ROUTE else None
        if taken is not None:
            if taken[1] is not None:
                await taken[1]
            await _reply(send, *self.recorded[taken[0]].result)  # type: ignore[misc]
            return
        await self._proxy(scope, path, body, send, kind)

    async def _take(self, kind: str, send: Any) -> None:
        request_id = f"floor-{next(self.ids)}"
        done = None
        if self.math is not None:
            done = asyncio.get_running_loop().run_in_executor(self.worker, self.math.run, kind)
        self.ops[request_id] = (kind, done)
        status, headers, body = self.recorded[kind].accepted  # type: ignore[misc]
        await _reply(send, status, headers, json.dumps({**json.loads(body), "request_id": request_id}).encode())

    async def _proxy(self, scope: dict[str, Any], path: str, body: bytes, send: Any, kind: str | None) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_HEADERS]
        url = path + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        r = await self.http.request(scope["method"], url, content=body, headers=headers)
        out = [(k.encode(), v.encode()) for k, v in r.headers.items() if k.encode().lower() not in _HOP_HEADERS]
        answer: Answer = (r.status_code, out, r.content)
        if kind is not None and r.status_code == 200 and self.recorded[kind].accepted is None:
            request_id = _request_id(r.content)
            if request_id is not None:
                self.recorded[kind].accepted = answer
                self.recording[request_id] = kind
        elif path == RETRIEVE_ROUTE and _final(answer):
            recorded_kind = self.recording.pop(_request_id(body) or "", None)
            if recorded_kind is not None:
                self.recorded[recorded_kind].result = answer
        await _reply(send, *answer)


async def _reply(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _shape(text: str) -> tuple[int, int]:
    rows, _, length = text.partition("x")
    return int(rows), int(length)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, required=True, help="port to listen on (127.0.0.1)")
    p.add_argument("--upstream", required=True, help="the real gateway's base URL")
    p.add_argument("--compute", type=Path, help="the model's directory: run each op's bare math before answering")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--fb-shape", type=_shape, default=(8, 128), help="forward_backward batch, ROWSxTOKENS")
    p.add_argument("--forward-shape", type=_shape, default=(1, 8), help="forward batch, ROWSxTOKENS")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the math")
    args = p.parse_args(argv)
    math = None
    if args.compute is not None:
        math = BareMath(args.compute, args.rank, args.fb_shape, args.forward_shape, args.threads)
    uvicorn.run(FloorApp(args.upstream, math), host="127.0.0.1", port=args.serve, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    for src in ("crds", "api_gateway", "trainer_pod", ".", "bench"):
        if str(repo / src) not in sys.path:
            sys.path.insert(0, str(repo / src))
    sys.exit(main())
