"""Ranks: process groups, the collectives the engine uses, and rank 0's control channel to the others.

Two groups. Tensors go over the default group (gloo on CPU, nccl on GPU) with a bounded timeout:
ranks inside one pass arrive within seconds of each other. Control messages (the next pass of PreparedOps, or
stop) go over a separate gloo group with a very long timeout, because ranks ≠ 0 wait there for as
long as the model sits idle, and an idle model must never trip a watchdog.

Sampling passes run on rank 0 alone, except on a sharded base (`sharding: fsdp`), where every forward
needs every rank's shards: then rank 0 broadcasts the start of the pass and, at every decode step, the
requests it admits (seeds made explicit), so every rank decodes the same rows in lockstep
(`execute_samples_everywhere`).

Failure rule: a rank that cannot go on exits non-zero at once (`fatal`), so its peers' next
collective fails, they exit too, and torchrun tears the group down. Nothing waits forever. The one
failure ranks survive is an `OpError` returned for an op on every rank alike (a deterministic
refusal): that op fails with its category, the pass's other ops go on, and the ranks stay in step.
Ranks disagreeing on an op (some failed it, some not) is a divergence and fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tinkerkube_contract.pod_api import ErrorCategory, OpKind
from tinkerkube_trainer.engine_api import (
    Collective,
    Engine,
    LocalCollective,
    OpError,
    OpOutput,
    PreparedOp,
    SampleFeed,
)
from tinkerkube_trainer.settings import DistEnv

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=365)  # idle ranks wait here; gloo needs a finite value
_STOP = "stop"
_PASS = "pass"
_PING = "ping"
_SAMPLE = "sample"  # a sampling pass on every rank (sharded base): then one _TAKE per decode step, then _END
_TAKE = "take"
_END = "end"


def fatal(message: str, *, code: int = 1, **fields: Any) -> None:
    """Log and leave now, without unwinding: threads blocked in collectives must not keep us alive."""
    log.log(logging.CRITICAL if code else logging.INFO, message, extra=fields)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


class TorchCollective:
    """engine_api.Collective over torch.distributed: tensors on the default group, objects on gloo."""

    def __init__(self, rank: int, world_size: int, control_group: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        self._control = control_group

    def all_reduce_sum_(self, tensors: list[Any]) -> None:
        """In place. Tensors of one dtype and device are flattened into one buffer: one collective
        per bucket instead of one per LoRA matrix."""
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for tensor in tensors:
            buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for group in buckets.values():
            if len(group) == 1 and group[0].is_contiguous():
                dist.all_reduce(group[0], op=dist.ReduceOp.SUM)
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for tensor in group:
                n = tensor.numel()
                tensor.copy_(flat[offset:offset + n].view_as(tensor))
                offset += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._control)
        return out


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    collective: Collective
    control_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(dist_env: DistEnv, *, device: str, collective_timeout_s: float) -> DistContext:
    """Join the group (blocks until every rank has joined). One rank: no process group at all."""
    dev = resolve_device(device, dist_env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist_env.world_size == 1:
        return DistContext(0, 1, dev, LocalCollective())
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    collective = TorchCollective(dist_env.rank, dist_env.world_size, control)
    return DistContext(dist_env.rank, dist_env.world_size, dev, collective, control)


def join(ctx: DistContext, engine: Engine) -> dict[int, Any]:
    """Every rank has built its engine: returns {rank: pid} (rank 0 marks itself ready after this)."""
    if not ctx.distributed:
        return {0: os.getpid()}
    gathered = ctx.collective.all_gather_object((ctx.rank, os.getpid()))
    return dict(gathered)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # peers may already be gone; we are leaving anyway
            log.warning("destroy_process_group failed", exc_info=True)


# ---- rank 0 → everyone ---------------------------------------------------------------------------


def _broadcast(ctx: DistContext, message: tuple[str, Any]) -> tuple[str, Any]:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=ctx.control_group)
    return box[0]


def execute_everywhere(ctx: DistContext, engine: Engine, ops: list[PreparedOp]) -> list[OpOutput | OpError]:
    """Rank 0, on the executor thread: hand the pass to every rank and run it here too."""
    if ctx.distributed:
        try:
            _broadcast(ctx, (_PASS, ops))
        except Exception as exc:
            fatal("broadcast to ranks failed; a rank is gone", error=repr(exc), ops=[str(op.kind) for op in ops])
    return execute_in_step(ctx, engine, ops)


def execute_local(engine: Engine, feed: SampleFeed) -> None:
    """Rank 0 alone (samples): no collective involved, so any failure is just those ops' failure."""
    engine.run_samples(feed)


def with_seed(op: PreparedOp) -> PreparedOp:
    """A sample without a seed gets one drawn here, on rank 0, so that every rank decoding it draws the
    same tokens (each rank's own `Generator.seed()` would not)."""
    params = getattr(op.payload, "params", None)
    if params is None or params.seed is not None:
        return op
    seed = int(torch.randint(0, 2**62, (1,), generator=_SEEDS).item())
    payload = dataclasses.replace(op.payload, params=dataclasses.replace(params, seed=seed))
    return dataclasses.replace(op, payload=payload)


_SEEDS = torch.Generator()
_SEEDS.seed()  # private: drawing seeds never moves the global RNG


class _LeaderFeed:
    """Rank 0's feed on a sharded base: every poll's requests (seeds made explicit) go to every rank
    too, so all ranks admit the same requests at the same decode step."""

    def __init__(self, ctx: DistContext, feed: SampleFeed) -> None:
        self._ctx, self._feed = ctx, feed

    def poll(self) -> list[tuple[Any, PreparedOp]]:
        taken = [(key, with_seed(op)) for key, op in self._feed.poll()]
        try:
            _broadcast(self._ctx, (_TAKE, [op for _, op in taken]))
        except Exception as exc:
            fatal("broadcast to ranks failed during a sampling pass; a rank is gone", error=repr(exc))
        return taken

    def done(self, key: Any, outcome: OpOutput | OpError) -> None:
        self._feed.done(key, outcome)

    def progress(self, key: Any) -> Any:
        progress = self._feed.progress(key)
        if progress is not None:
            progress.stoppable = False  # followers decode it to the end: so must rank 0, or the ranks diverge
        return progress

    def stepped(self) -> None:
        self._feed.stepped()


class RanksDiverged(RuntimeError):
    """A follower's decode and rank 0's disagree on when the sampling pass ends."""


class _FollowerFeed:
    """A follower's feed on a sharded base: what rank 0 polled, step by step; results are rank 0's to send."""

    def __init__(self, ctx: DistContext) -> None:
        self._ctx = ctx

    def poll(self) -> list[tuple[Any, PreparedOp]]:
        kind, ops = _broadcast(self._ctx, (_END, None))
        if kind != _TAKE:
            raise RanksDiverged(f"rank 0 sent {kind!r} while this rank was still decoding")
        return list(enumerate(ops))

    def done(self, key: Any, outcome: OpOutput | OpError) -> None:
        return None

    def progress(self, key: Any) -> None:
        return None

    def stepped(self) -> None:
        return None


def execute_samples_everywhere(ctx: DistContext, engine: Engine, feed: SampleFeed) -> None:
    """Rank 0, on the executor thread, sharded base: every forward of the decode needs every rank's
    shards, so the sampling pass runs on every rank in lockstep. A failure here cannot be one op's:
    the others sit in the same collectives, so it fails the group (module rule)."""
    if not ctx.distributed:
        engine.run_samples(feed)
        return
    try:
        _broadcast(ctx, (_SAMPLE, None))
        engine.run_samples(_LeaderFeed(ctx, feed))  # type: ignore[arg-type]
        _broadcast(ctx, (_END, None))
    except Exception as exc:
        log.exception("sampling pass raised on rank 0")
        fatal("a sampling pass failed on rank 0; failing the whole group", error=repr(exc))


def _follow_samples(ctx: DistContext, engine: Engine) -> None:
    try:
        engine.run_samples(_FollowerFeed(ctx))  # type: ignore[arg-type]
        kind, _ = _broadcast(ctx, (_END, None))
        if kind != _END:
            raise RanksDiverged(f"this rank finished decoding but rank 0 sent {kind!r}")
    except Exception as exc:
        log.exception("sampling pass raised on this rank", extra={"rank": ctx.rank})
        fatal("a rank failed inside a sampling pass; failing the whole group", rank=ctx.rank, error=repr(exc))


def heartbeat(ctx: DistContext) -> None:
    """Rank 0, on the executor thread, while idle: every rank answers, or the group is failed now.
    (Ranks ≠ 0 notice rank 0's death by themselves; rank 0 would otherwise only notice a dead peer
    on another node at its next op.)"""
    if not ctx.distributed:
        return
    try:
        _broadcast(ctx, (_PING, None))
        ctx.collective.all_gather_object(ctx.rank)
    except Exception as exc:
        fatal("heartbeat failed; a rank is gone", error=repr(exc))


def stop_workers(ctx: DistContext) -> None:
    """Rank 0, on the executor thread (after the last op): release the worker loops."""
    if ctx.distributed:
        try:
            _broadcast(ctx, (_STOP, None))
        except Exception:
            log.warning("stop broadcast failed; ranks are already gone", exc_info=True)


def execute_in_step(ctx: DistContext, engine: Engine, ops: list[PreparedOp]) -> list[OpOutput | OpError]:
    """Run the pass on this rank, then agree with the others on each op's outcome (see the module's
    failure rule: every rank must fail an op alike, or the group is failed)."""
    try:
        outcomes = engine.run_pass(ops)
    except Exception as exc:
        if not ctx.distributed:
            raise
        log.exception("pass raised on this rank", extra={"ops": [str(op.kind) for op in ops], "rank": ctx.rank})
        fatal("a rank failed inside a pass; failing the whole group", rank=ctx.rank, error=repr(exc))
    if not ctx.distributed:
        return outcomes
    errors = [(o.message, o.code, str(o.category)) if isinstance(o, OpError) else None for o in outcomes]
    try:
        every = ctx.collective.all_gather_object(errors)
    except Exception as exc:
        fatal("ranks could not agree on a pass's outcome; a rank is gone", error=repr(exc))
    agreed: list[OpOutput | OpError] = []
    for i, outcome in enumerate(outcomes):
        failed = [rank_errors[i] for rank_errors in every if rank_errors[i] is not None]
        if failed and len(failed) != len(every):
            fatal("ranks diverged: an op failed on some ranks only", op=str(ops[i].kind), outcomes=repr(every))
        if failed:
            message, code, category = failed[0]
            agreed.append(OpError(message, code=code, category=ErrorCategory(category)))
        else:
            agreed.append(outcome)
    return agreed


def worker_loop(ctx: DistContext, engine: Engine) -> None:
    """Ranks ≠ 0: run what rank 0 broadcasts until it says stop. Any failure ends the process."""
    while True:
        try:
            kind, payload = _broadcast(ctx, (_STOP, None))
        except Exception as exc:
            fatal("lost rank 0; leaving", error=repr(exc), rank=ctx.rank)
        if kind == _STOP:
            log.info("stop received", extra={"rank": ctx.rank})
            return
        if kind == _PING:
            try:
                ctx.collective.all_gather_object(ctx.rank)
            except Exception as exc:
                fatal("heartbeat failed; a rank is gone", error=repr(exc), rank=ctx.rank)
            continue
        if kind == _SAMPLE:
            _follow_samples(ctx, engine)
            continue
        ops: list[PreparedOp] = payload
        if any(op.kind is OpKind.SAMPLE for op in ops):  # never broadcast, but stay in step if it ever were
            continue
        execute_in_step(ctx, engine, ops)  # every rank failed alike or not at all; rank 0 reports it
