"""Prometheus collectors for the trainer (rank 0 serves them on /metrics).

One registry per runtime (not the global default), so several apps in one test process never clash.
Token counts come from the results themselves (the wire formats), so they need nothing from the engine.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tinkerkube_contract.pod_api import CONTENT_PROTOBUF, OpKind

OP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return float(int(fh.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return float(peak if sys.platform == "darwin" else peak * 1024)


def _cuda_bytes(which: str) -> float:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return float(torch.cuda.memory_allocated() if which == "allocated" else torch.cuda.memory_reserved())


class TrainerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.op_seconds = Histogram("tinkerkube_trainer_op_seconds",
                                    "Time an op ran on the model (queue wait excluded)",
                                    ["op"], buckets=OP_BUCKETS, registry=r)
        self.op_wait_seconds = Histogram("tinkerkube_trainer_op_wait_seconds", "Time from submit to start",
                                         ["op"], buckets=OP_BUCKETS, registry=r)
        self.ops_total = Counter("tinkerkube_trainer_ops_total", "Ops finished", ["op", "outcome"], registry=r)
        self.rejected_total = Counter("tinkerkube_trainer_rejected_total", "Requests refused before queueing",
                                      ["code"], registry=r)
        self.tokens_total = Counter("tinkerkube_trainer_tokens_total", "Tokens processed (fb: input tokens; "
                                    "sample: generated tokens)", ["op"], registry=r)
        self.crashed_ops_total = Counter("tinkerkube_trainer_crashed_ops_total", "Ops failed without running "
                                         "because the trainer died twice while they ran (pass_journal.py)", registry=r)
        self.queue_depth = Gauge("tinkerkube_trainer_queue_depth", "Ops submitted and not finished", registry=r)
        self.runs = Gauge("tinkerkube_trainer_runs", "Runs attached to this pool", registry=r)
        self.max_runs = Gauge("tinkerkube_trainer_max_runs", "Runs this pool can hold", registry=r)
        self.pass_ops = Histogram("tinkerkube_trainer_pass_ops", "Ops run together in one pass (co-batch size)",
                                  ["kind"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.ready = Gauge("tinkerkube_trainer_ready", "1 once the engine is built and every rank joined",
                           registry=r)
        self.world_size = Gauge("tinkerkube_trainer_world_size", "Ranks in the group", registry=r)
        self.memory = Gauge("tinkerkube_trainer_memory_bytes", "Rank 0 memory", ["kind"], registry=r)
        self.memory.labels(kind="rss").set_function(rss_bytes)
        self.memory.labels(kind="cuda_allocated").set_function(lambda: _cuda_bytes("allocated"))
        self.memory.labels(kind="cuda_reserved").set_function(lambda: _cuda_bytes("reserved"))

    def observe_finished(self, op: str, outcome: str, *, wait_s: float | None, run_s: float | None,
                         tokens: int = 0) -> None:
        self.ops_total.labels(op=op, outcome=outcome).inc()
        if run_s is not None:
            self.op_seconds.labels(op=op).observe(run_s)
        if wait_s is not None:
            self.op_wait_seconds.labels(op=op).observe(wait_s)
        if tokens:
            self.tokens_total.labels(op=op).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_tokens(kind: OpKind, content_type: str, body: bytes) -> int:
    """Tokens an op's result covers: fb/forward → the length of every datum's `logprobs` (one per
    input token); sample → the generated tokens. 0 when the body is not the expected protobuf."""
    if content_type != CONTENT_PROTOBUF or not body:
        return 0
    try:
        from tinker.proto import tinker_public_pb2 as pb
    except ImportError:  # pragma: no cover - the SDK is a trainer dependency
        return 0
    try:
        if kind is OpKind.FORWARD_BACKWARD:
            out = pb.ForwardBackwardOutput.FromString(body)
            total = 0
            for record in out.loss_fn_outputs:
                field = record.fields.get("logprobs") if "logprobs" in record.fields else None
                if field is not None:
                    total += len(field.data) // _itemsize(field.dtype)
            return total
        if kind is OpKind.SAMPLE:
            resp = pb.SampleResponse.FromString(body)
            return sum(len(seq.tokens) // 4 for seq in resp.sequences)
    except Exception:
        return 0
    return 0


def _itemsize(dtype: Any) -> int:
    # DTYPE_FLOAT32 = 1, INT64 = 2, INT32 = 3, BFLOAT16 = 4
    return {1: 4, 2: 8, 3: 4, 4: 2}.get(int(dtype), 4)
