"""Rank 0's runtime: what the pod API (`http_api.create_app`) serves.

`TrainerRuntime` owns the boot (on the op thread), the engine once built, the scheduler (runs, their
ordered ops, samples) and the metrics. No heavy work on the event loop: `prepare` (which may decode
a big protobuf) runs on a small prepare pool, and passes on the single op thread, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import OpKind, RunSpec, RunState
from tinkerkube_trainer.engine_api import Engine, OpError, OpOutput, PreparedOp
from tinkerkube_trainer.metrics import TrainerMetrics, count_tokens
from tinkerkube_trainer.pass_journal import PassJournal, journaled
from tinkerkube_trainer.run_queue import Entry, RunConflict, RunSlot, RunUnavailable
from tinkerkube_trainer.scheduler import Limits, SampleRunner, Scheduler

log = logging.getLogger(__name__)


PassRunner = Callable[[list[PreparedOp]], list["OpOutput | OpError"]]


@dataclass
class Booted:
    """What the boot (run on the op thread) hands the runtime once every rank has joined."""

    engine: Engine
    run_training: PassRunner  # rank 0: broadcast the pass + run it in step with every rank
    run_sample: SampleRunner  # rank 0 alone
    world_size: int = 1
    info: dict[str, Any] = field(default_factory=dict)  # engine.info() at boot
    heartbeat: Callable[[], None] | None = None  # rank 0, while idle: checks every rank is still there


@dataclass
class RuntimeOptions:
    base_model: str
    boot_run: RunSpec | None = None  # attached at boot (a pool started for one run)
    world_size: int = 1
    token: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_wait_seconds: float = api.MAX_WAIT_SECONDS
    heartbeat_seconds: float = 5.0
    max_lora_rank: int = 128
    limits: Limits = field(default_factory=Limits)
    pass_journal: Path | None = None  # rank 0's journal of the running pass (pass_journal.py); None: off


class TrainerRuntime:
    def __init__(self, options: RuntimeOptions, boot: Callable[[], Booted], *,
                 on_boot_failure: Callable[[BaseException], None] | None = None,
                 on_stop: Callable[[], None] | None = None, metrics: TrainerMetrics | None = None) -> None:
        self.options = options
        self.boot_id = str(uuid.uuid4())
        self.metrics = metrics or TrainerMetrics()
        self.metrics.world_size.set(options.world_size)
        self.metrics.max_runs.set(options.limits.max_runs)
        self._boot = boot
        self._on_boot_failure = on_boot_failure
        self._on_stop = on_stop
        self.op_executor = ThreadPoolExecutor(1, thread_name_prefix="tinkerkube-op")
        self.prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="tinkerkube-prepare")
        self.booted: Booted | None = None
        self.scheduler: Scheduler | None = None
        self.boot_error: str | None = None
        self._boot_task: asyncio.Task[None] | None = None

    @classmethod
    def for_engine(cls, engine: Engine, options: RuntimeOptions, **kwargs: Any) -> TrainerRuntime:
        """One rank, engine already built (tests, benchmarks)."""
        return cls(options, lambda: Booted(engine, engine.run_pass, engine.run_samples, 1, dict(engine.info())),
                   **kwargs)

    @property
    def ready(self) -> bool:
        """Booted, and the boot run (if any) attached: what readiness probes wait for."""
        if self.scheduler is None:
            return False
        boot_run = self.options.boot_run
        return boot_run is None or (self.scheduler.slots.get(boot_run.model_id, None) is not None and \
            self.scheduler.slots[boot_run.model_id].state is RunState.READY)

    async def start(self) -> None:
        if self._boot_task is None:
            self._boot_task = asyncio.get_running_loop().create_task(self._run_boot(), name="trainer-boot")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await self.start()
        assert self._boot_task is not None
        await asyncio.wait_for(asyncio.shield(self._boot_task), timeout)
        if self.scheduler is None:
            raise RuntimeError(f"trainer failed to boot: {self.boot_error}")
        boot_run = self.options.boot_run
        if boot_run is not None:
            slot = await self.scheduler.wait_slot(self.scheduler.slots[boot_run.model_id], timeout)
            if slot.state is not RunState.READY:
                raise RuntimeError(f"the boot run failed to attach: {slot.error}")

    async def _run_boot(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            booted = await loop.run_in_executor(self.op_executor, self._boot)
        except asyncio.CancelledError:  # stopped while booting: not a failure
            raise
        except BaseException as exc:
            self.boot_error = repr(exc)
            log.exception("boot failed")
            if self._on_boot_failure is not None:
                self._on_boot_failure(exc)
            return
        self.booted = booted
        run_training = booted.run_training
        if self.options.pass_journal is not None:
            run_training = journaled(run_training, PassJournal(self.options.pass_journal),
                                     self.metrics.crashed_ops_total.inc)
        self.scheduler = Scheduler(
            run_training=run_training, run_sample=booted.run_sample, executor=self.op_executor,
            limits=self.options.limits, on_finish=self._finished, on_pass=self._pass_done,
            idle_task=booted.heartbeat, idle_interval=self.options.heartbeat_seconds,
            new_id=lambda: str(uuid.uuid4()))
        self.scheduler.start()
        self.metrics.ready.set(1)
        self.metrics.queue_depth.set_function(lambda: float(self.scheduler.depth if self.scheduler else 0))
        self.metrics.runs.set_function(lambda: float(len(self.scheduler.slots) if self.scheduler else 0))
        log.info("ready", extra={"boot_seconds": round(time.monotonic() - started, 3),
                                 "world_size": booted.world_size, "boot_id": self.boot_id})
        if self.options.boot_run is not None:
            try:
                self.attach(self.options.boot_run, booted.engine.prepare_attach(self.options.boot_run))
            except (OpError, RunConflict, RunUnavailable) as exc:
                self.boot_error = f"the boot run cannot attach: {exc}"
                log.error("boot run refused", extra={"error": str(exc)})

    def attach(self, spec: RunSpec, prepared: PreparedOp) -> RunSlot:
        assert self.scheduler is not None
        return self.scheduler.attach(spec, prepared)

    def _finished(self, entry: Entry) -> None:
        wait = (entry.started_at - entry.submitted_at) if entry.started_at is not None else None
        run = (entry.finished_at - entry.started_at) if entry.started_at and entry.finished_at else None
        output = entry.output
        tokens = 0 if output is None or not isinstance(entry.kind, OpKind) else \
            count_tokens(entry.kind, output.content_type, output.body)
        self.metrics.observe_finished(str(entry.kind), str(entry.state), wait_s=wait, run_s=run, tokens=tokens)
        log.info("op finished", extra={"op": str(entry.kind), "key": entry.key, "state": str(entry.state),
                                       "run_s": round(run or 0.0, 4), "wait_s": round(wait or 0.0, 4)})

    def _pass_done(self, kind: str, size: int) -> None:
        self.metrics.pass_ops.labels(kind=kind).observe(size)

    async def stop(self) -> None:
        """Finish the running pass, run nothing more, release the other ranks."""
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
        if self._on_stop is not None and self.booted is not None:
            await asyncio.get_running_loop().run_in_executor(self.op_executor, self._on_stop)
        self.op_executor.shutdown(wait=False, cancel_futures=True)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TrainerRuntime]:
        await self.wait_ready()
        try:
            yield self
        finally:
            await self.stop()

    def pool_info(self) -> api.PoolInfo:
        extra = dict(self.booted.info) if self.booted else {}
        return api.PoolInfo(
            base_model=self.options.base_model, world_size=self.booted.world_size if self.booted else
            self.options.world_size, ready=self.ready, boot_id=self.boot_id, max_runs=self.options.limits.max_runs,
            max_lora_rank=self.options.max_lora_rank, runs=sorted(self.scheduler.slots) if self.scheduler else [],
            tokenizer_dir=extra.get("tokenizer_dir"), vocab_size=extra.get("vocab_size"))

    def run_info(self, slot: RunSlot) -> api.RunInfo:
        extra = dict(self.booted.info) if self.booted else {}
        last = slot.queue.last_finished_seq if slot.queue is not None else None
        live: dict[str, Any] = {}
        if slot.state is RunState.READY and self.booted is not None:
            with contextlib.suppress(Exception):  # detached meanwhile: report what the attach said
                live = self.booted.engine.run_info(slot.spec.model_id)
        return api.RunInfo(
            model_id=slot.spec.model_id, base_model=slot.spec.base_model, mode=slot.spec.mode,
            lora=slot.info.get("lora") or slot.spec.lora, world_size=self.booted.world_size if self.booted else 1,
            ready=slot.state is RunState.READY, boot_id=slot.attach_id, tokenizer_dir=extra.get("tokenizer_dir"),
            vocab_size=extra.get("vocab_size"), last_completed_seq_id=last,
            restored_from=slot.info.get("restored_from"), state=slot.state, error=slot.error,
            num_bytes=live.get("num_bytes", slot.info.get("num_bytes")))
