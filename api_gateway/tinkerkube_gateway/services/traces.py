"""Session trace export: every request of a session as spans in Chrome/Perfetto trace JSON.

Per request (a future) one span from submit to result stored, with what is known inside it: how long it
waited in the gateway before it was forwarded to its trainer, how long it queued on the trainer and ran
there (the trainer reports both durations with its answer, `pod_api.OpTiming`). Submit and result times
come from the store, so every request of the session is in the trace whichever replica handled it; the
forwarding and trainer times are kept in memory by the replica that forwarded the request (the last
`MAX_MARKS` requests), so a request forwarded before a restart, or by another replica, shows its outer
span only.

Layout: one process per run or sampling session, each request an async slice of its own (samples of one
sampler overlap), named `<op> #<seq_id>`; open the file in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from tinkerkube_contract.pod_api import OpTiming
from tinkerkube_gateway.clients.pod_client import op_key
from tinkerkube_gateway.store.records import FutureOp, FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo

MAX_MARKS = 100_000


@dataclass
class Marks:
    forwarded_at: float | None = None
    answered_at: float | None = None
    timing: OpTiming | None = None


class TraceRecorder:
    """A `PodObserver`: when requests went to trainers and what the trainers said of them (bounded)."""

    def __init__(self, max_marks: int = MAX_MARKS):
        self._marks: collections.OrderedDict[str, Marks] = collections.OrderedDict()
        self._max = max_marks

    def _mark(self, key: str) -> Marks:
        marks = self._marks.get(key)
        if marks is None:
            marks = self._marks[key] = Marks()
            if len(self._marks) > self._max:
                self._marks.popitem(last=False)
        return marks

    def forwarded(self, key: str) -> None:
        self._mark(key).forwarded_at = time.time()

    def answered(self, key: str, timing: OpTiming | None) -> None:
        marks = self._mark(key)
        marks.answered_at, marks.timing = time.time(), timing

    def get(self, key: str) -> Marks | None:
        return self._marks.get(key)


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _span(name: str, cat: str, pid: int, key: str, start: float, end: float, args: dict[str, Any]) -> list[dict]:
    """A nestable async slice: begin and end events with one (cat, id): Perfetto nests those of one request."""
    base = {"name": name, "cat": cat, "pid": pid, "tid": 0, "id": key}
    return [{**base, "ph": "b", "ts": _us(start), "args": args}, {**base, "ph": "e", "ts": _us(max(start, end))}]


def request_events(fut: FutureRecord, pid: int, marks: Marks | None, now: float) -> list[dict[str, Any]]:
    end = fut.completed_at if fut.completed_at is not None else now
    label = f"{fut.op} #{fut.seq_id}" if fut.seq_id is not None else str(fut.op)
    args: dict[str, Any] = {"request_id": fut.request_id, "seq_id": fut.seq_id, "state": fut.state.value}
    if fut.error:
        args["error"] = fut.error[:500]
    if fut.trainer_seq is not None:
        args["trainer_seq"] = fut.trainer_seq
    events = _span(label, "request", pid, fut.request_id, fut.created_at, end, args)
    inner: list[dict[str, Any]] = []
    if marks is not None and marks.forwarded_at is not None:
        inner += _span("in the gateway", "request", pid, fut.request_id, fut.created_at, marks.forwarded_at, {})
        if marks.answered_at is not None and marks.timing is not None:
            finished = min(marks.answered_at, end)
            started = max(marks.forwarded_at, finished - marks.timing.run_s)
            queued = max(marks.forwarded_at, started - marks.timing.wait_s)
            inner += _span("trainer queue", "request", pid, fut.request_id, queued, started, {})
            inner += _span("on the trainer", "request", pid, fut.request_id, started, finished,
                           {"run_s": marks.timing.run_s})
    if fut.state != FutureState.PENDING:
        inner.append({"name": "result stored" if fut.state == FutureState.COMPLETE else "failed", "cat": "request",
                      "ph": "n", "pid": pid, "tid": 0, "id": fut.request_id, "ts": _us(end)})
    return [events[0], *inner, events[1]]


def _marks_for(recorder: TraceRecorder, fut: FutureRecord) -> Marks | None:
    if fut.op == FutureOp.SAMPLE:
        return recorder.get(fut.request_id)
    return None if fut.trainer_seq is None else recorder.get(op_key(fut.target_id, fut.trainer_seq))


class TraceService:
    def __init__(self, repo: AsyncRepo, recorder: TraceRecorder):
        self.repo = repo
        self.recorder = recorder

    async def build(self, session_id: str) -> dict[str, Any]:
        futures = await self.repo.futures_for_session(session_id)
        now = time.time()
        pids: dict[str, int] = {}
        events: list[dict[str, Any]] = []
        for fut in futures:
            pid = pids.get(fut.target_id)
            if pid is None:
                pid = pids[fut.target_id] = len(pids) + 1
                kind = "sampler" if fut.op == FutureOp.SAMPLE else "run"
                events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                               "args": {"name": f"{kind} {fut.target_id}"}})
            events += request_events(fut, pid, _marks_for(self.recorder, fut), now)
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"session_id": session_id, "requests": len(futures), "exported_at": now}}
