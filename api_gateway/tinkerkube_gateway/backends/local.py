"""LocalBackend: trainer pools on this machine (the embedded default).

A pool is one trainer process group (`python -m torch.distributed.run ... -m tinkerkube_trainer.main`,
contract `launch.torchrun_argv` + `launch.pool_env`) holding one base model resident, on 127.0.0.1
with a free port and the gateway's random trainer token, in its own process group (so stopping it
kills every rank), logging to `<state>/logs/<pool>.log`. Every run (and every sampler) of a tenant
and base model is attached to a pool of that tenant and base model with a free slot (a new pool is
started when none has one), so a second client on a warm pool costs an attach, not a model load.
Tenants never share a pool unless `share_pools_across_tenants` says so. A pool whose last run left
stops after `pool_idle_seconds`.

Supervision, equal to the operator's: a pool that died is started again when one of its runs next
needs it (`handle`), and its runs attach again with `RunSpec.resume` (from their newest durable
checkpoint); the worker then replays the ops after it from the op log. A restarted gateway adopts the
pools still running (a state file per pool: pid, url, token, runs) and brings back the runs of those
that are not. A pool that keeps dying (`pool_max_restarts` within `pool_restart_window_seconds`) stays
down and its runs fail clearly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinkerkube_contract import env as contract_env
from tinkerkube_contract import launch
from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec
from tinkerkube_gateway.backends.attach import attach_run
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.backends.processes import (
    Adopted,
    free_port,
    is_ours,
    kill_group,
    kill_workers,
    read_state,
    tail,
)
from tinkerkube_gateway.clients.pod_client import OpRejected, PodClient, TrainerUnreachable

log = logging.getLogger(__name__)
SHARED = "*"  # the tenant part of a pool key when tenants share pools


@dataclass(frozen=True, slots=True)
class LocalBackendConfig:
    checkpoint_dir: Path
    logs_dir: Path
    model_cache_dir: Path
    token: str
    base_env: dict[str, str]
    nproc_per_node: int = 1
    device: str = "auto"
    sharding: str = "replicate"  # replicate | fsdp (launch.pool_env)
    sampler: str = "hf"  # hf | vllm (launch.pool_env)
    model_aliases: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # replaces torchrun (tests' fake trainer)
    pool_max_runs: int = 8
    pool_max_lora_rank: int = 512
    pool_idle_seconds: float = 300.0
    share_pools_across_tenants: bool = False
    pool_max_restarts: int = 3
    pool_restart_window_seconds: float = 600.0
    pool_hang_seconds: float = 60.0  # a pool that answers no health check for this long is killed and restarted
    start_timeout: float = 300.0
    auto_checkpoint_steps: int | None = None  # the pools' automatic checkpoint interval (None: the trainer's)


@dataclass(eq=False)
class _Pool:
    name: str
    key: tuple[str, str]  # (tenant or SHARED, base model)
    proc: subprocess.Popen[bytes] | Adopted
    url: str
    token: str
    log_path: Path
    pid_path: Path
    runs: dict[str, TrainingSessionSpec] = field(default_factory=dict)  # placed here (attaching or attached)
    idle_timer: asyncio.TimerHandle | None = None
    restarts: list[float] = field(default_factory=list)  # when this pool's predecessors were started again
    successor: _Pool | None = None
    silent_since: float | None = None  # when its health checks started failing while it ran
    journal: str = ""  # its pass journal's name: its first predecessor's name, kept across restarts
    attached: set[str] = field(default_factory=set)  # runs attached to this process (not merely placed)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def handle(self) -> TrainerHandle:
        return TrainerHandle(self.url, self.token)

    @property
    def state_path(self) -> Path:
        return self.pid_path.with_suffix(".pool.json")

    def write_state(self) -> None:
        """Where the pool listens and what it holds, beside its pid file (diagnostics, orphan handling)."""
        tmp = self.state_path.with_suffix(".tmp")
        runs = {m: spec.model_dump(mode="json") for m, spec in sorted(self.runs.items())}
        tmp.write_text(json.dumps({"pid": self.proc.pid, "url": self.url, "token": self.token, "tenant": self.key[0],
                                   "base_model": self.key[1], "runs": runs, "journal": self.journal}))
        tmp.replace(self.state_path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class LocalBackend:
    def __init__(self, config: LocalBackendConfig, pod_client: PodClient):
        self._config = config
        self._pods = pod_client
        self._pools: dict[str, _Pool] = {}
        self._placed: dict[str, _Pool] = {}  # model_id → the pool it is attached to
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._orphans: dict[str, TrainingSessionSpec] = {}  # runs of pools that died with a previous gateway
        self._reviving = asyncio.Lock()
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_pools()

    def _adopt_pools(self) -> None:
        """A previous gateway's pools: adopt those still running (with their runs), remember the runs of the
        others to bring them back when they are next needed, and clean up what is left of them."""
        for pid_file in self._config.logs_dir.glob("*.pid"):
            state = read_state(pid_file.with_suffix(".pool.json"))
            try:
                pid = int(pid_file.read_text().strip())
            except (ValueError, OSError):
                pid = 0
            if state is not None and pid and is_ours(pid):
                self._adopt(pid_file, pid, state)
                continue
            if pid and is_ours(pid):  # no state to adopt it by: an orphan
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            kill_workers(pid_file.with_suffix(".log"))
            for model_id, raw in (state or {}).get("runs", {}).items():
                with contextlib.suppress(ValueError):
                    self._orphans[model_id] = TrainingSessionSpec.model_validate(raw)
            pid_file.unlink(missing_ok=True)
            pid_file.with_suffix(".pool.json").unlink(missing_ok=True)
        if self._orphans:
            log.warning("runs whose trainer pool died with the previous gateway come back when next used: %s",
                        sorted(self._orphans))

    def _adopt(self, pid_file: Path, pid: int, state: dict[str, object]) -> None:
        runs = {m: TrainingSessionSpec.model_validate(raw) for m, raw in dict(state["runs"]).items()}  # type: ignore[call-overload]
        pool = _Pool(pid_file.stem, (str(state["tenant"]), str(state["base_model"])), Adopted(pid),
                     str(state["url"]), str(state["token"]), pid_file.with_suffix(".log"), pid_file, runs,
                     journal=str(state.get("journal") or pid_file.stem), attached=set(runs))
        self._pools[pool.name] = pool
        for model_id in runs:
            self._placed[model_id] = pool
        log.warning("adopted trainer pool %s (pid %d) from a previous gateway with runs %s", pool.name, pid,
                    sorted(runs))

    # ---- placement ---------------------------------------------------------------------------------

    def _key(self, spec: TrainingSessionSpec) -> tuple[str, str]:
        return (SHARED if self._config.share_pools_across_tenants else spec.owner, spec.base_model)

    def _pool_with_room(self, key: tuple[str, str]) -> _Pool | None:
        for pool in self._pools.values():
            if pool.key == key and pool.alive and len(pool.runs) < self._config.pool_max_runs:
                return pool
        return None

    def _start_pool(self, key: tuple[str, str], journal: str | None = None) -> _Pool:
        """`journal`: a dead predecessor's, so that the new pool reads the pass it died in."""
        cfg = self._config
        name = _safe(f"pool-{key[0]}-{key[1]}-{os.getpid()}-{next(self._numbers)}")
        journal = journal or name
        port = free_port()
        argv = list(cfg.command) if cfg.command else launch.torchrun_argv(
            nnodes=1, nproc_per_node=cfg.nproc_per_node, node_rank=0, master_addr="127.0.0.1",
            master_port=free_port())
        env = {k: v for k, v in cfg.base_env.items() if not k.startswith(contract_env.PREFIX)}  # launcher's only
        env.setdefault("OMP_NUM_THREADS", str(local_torch_threads(os.cpu_count() or 1, cfg.nproc_per_node)))
        env.update(launch.pool_env(
            key[1], checkpoint_dir=str(cfg.checkpoint_dir), port=port, host="127.0.0.1", auth_token=cfg.token,
            model_cache_dir=str(cfg.model_cache_dir), model_aliases=cfg.model_aliases or None, device=cfg.device,
            max_runs=cfg.pool_max_runs, max_lora_rank=cfg.pool_max_lora_rank,
            auto_checkpoint_steps=cfg.auto_checkpoint_steps, sharding=cfg.sharding,
            sampler=cfg.sampler, pass_journal=str(cfg.checkpoint_dir / ".pass-journal" / f"{journal}.json")))
        log_path = cfg.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        pid_path = cfg.logs_dir / f"{name}.pid"
        pid_path.write_text(str(proc.pid))
        pool = self._pools[name] = _Pool(name, key, proc, f"http://127.0.0.1:{port}", cfg.token, log_path, pid_path,
                                         journal=journal)
        pool.write_state()
        log.info("started trainer pool %s for %s (pid %d, port %d, log %s)", name, key, proc.pid, port, log_path)
        return pool

    async def start(self, spec: TrainingSessionSpec) -> None:
        current = self._placed.get(spec.model_id)
        if current is not None and current.alive:
            return
        key = self._key(spec)
        pool = self._pool_with_room(key) or self._start_pool(key)
        if pool.idle_timer is not None:
            pool.idle_timer.cancel()
            pool.idle_timer = None
        pool.runs[spec.model_id] = spec
        self._placed[spec.model_id] = pool
        pool.write_state()

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        pool = self._placed.get(model_id)
        if pool is None:
            raise TrainerStartFailed(f"no trainer was started for {model_id}")
        deadline = time.monotonic() + timeout
        handle = pool.handle
        while not await self._pods.ready(pool.url, pool.token):
            self._check_alive(pool, model_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer pool for {model_id} not ready within {timeout:.0f}s (log {pool.log_path})")
            await asyncio.sleep(0.2)
        try:
            await attach_run(self._pods, handle, pool.runs[model_id], deadline,
                             where=f"its trainer pool (log {pool.log_path})")
        except TrainerUnreachable:
            self._check_alive(pool, model_id)
            raise
        pool.attached.add(model_id)
        return handle

    def _check_alive(self, pool: _Pool, model_id: str) -> None:
        code = pool.proc.poll()
        if code is not None:
            raise TrainerStartFailed(f"the trainer pool for {model_id} exited with code {code} while starting; "
                                     f"last log lines:\n{tail(pool.log_path)}", retryable=False)

    async def handle(self, model_id: str) -> TrainerHandle | None:
        """Where the run is served now. A run whose pool died is brought back first (the pool started again,
        the run attached again from its newest durable state); None when that cannot be done."""
        pool = self._placed.get(model_id)
        if pool is not None and pool.alive and not await self._hung(pool):
            if model_id in pool.attached:
                return pool.handle
            return await self._attach_again(model_id)  # placed on a successor another run brought back
        if pool is None:
            orphan = self._orphans.pop(model_id, None)
            if orphan is None:
                return None
            await self.start(orphan)
        elif await self._revive(pool) is None:
            return None
        return await self._attach_again(model_id)

    async def _attach_again(self, model_id: str) -> TrainerHandle | None:
        try:
            return await self.wait_ready(model_id, self._config.start_timeout)
        except (TrainerStartFailed, TimeoutError, TrainerUnreachable) as exc:
            log.error("could not bring back %s: %s", model_id, exc)
            return None

    async def _hung(self, pool: _Pool) -> bool:
        """A running pool that has not answered its health checks for `pool_hang_seconds` is killed (so that
        it is started again): a stuck pool must not hold its runs' futures forever."""
        if await self._pods.ready(pool.url, pool.token):
            pool.silent_since = None
            return False
        now = time.monotonic()
        pool.silent_since = pool.silent_since or now
        if now - pool.silent_since < self._config.pool_hang_seconds:
            return False
        log.error("trainer pool %s has not answered for %.0fs; killing it", pool.name, now - pool.silent_since)
        await asyncio.to_thread(kill_group, pool.proc, 0.5)
        return True

    async def _revive(self, dead: _Pool) -> _Pool | None:
        """Start a dead pool again with its runs (once, whichever of its runs asks first)."""
        async with self._reviving:
            if dead.successor is not None:
                return dead.successor if dead.successor.alive else await self._revive(dead.successor)
            now = time.monotonic()
            recent = [t for t in dead.restarts if now - t < self._config.pool_restart_window_seconds]
            if len(recent) >= self._config.pool_max_restarts:
                log.error("trainer pool %s died again after %d restarts; its runs %s stay down", dead.name,
                          len(recent), sorted(dead.runs))
                return None
            log.warning("trainer pool %s died (exit code %s); starting it again for %s", dead.name,
                        dead.proc.poll(), sorted(dead.runs))
            self._pools.pop(dead.name, None)
            await asyncio.to_thread(kill_workers, dead.log_path)
            dead.pid_path.unlink(missing_ok=True)
            dead.state_path.unlink(missing_ok=True)
            pool = self._start_pool(dead.key, dead.journal)
            pool.runs, pool.restarts = dict(dead.runs), [*recent, now]
            for model_id in pool.runs:
                self._placed[model_id] = pool
            pool.write_state()
            dead.successor = pool
            return pool

    def exit_reason(self, model_id: str) -> str:
        pool = self._placed.get(model_id)
        if pool is None:
            return f"no trainer is running for {model_id}"
        return f"its trainer pool exited with code {pool.proc.poll()}; last log lines:\n{tail(pool.log_path)}"

    # ---- leaving -----------------------------------------------------------------------------------

    async def stop(self, model_id: str) -> None:
        pool = self._placed.pop(model_id, None)
        if pool is None:
            return
        pool.runs.pop(model_id, None)
        pool.write_state()
        if pool.alive:
            with contextlib.suppress(TrainerUnreachable, OpRejected):
                await self._pods.detach(pool.handle, model_id)
        if not pool.runs:
            self._idle(pool)

    def _idle(self, pool: _Pool) -> None:
        """No run left: stop the pool after the idle timeout unless a run is placed on it meanwhile."""
        def expire() -> None:
            if not pool.runs:
                task = asyncio.ensure_future(self._stop_pool(pool))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        pool.idle_timer = asyncio.get_running_loop().call_later(self._config.pool_idle_seconds, expire)

    async def _stop_pool(self, pool: _Pool) -> None:
        self._pools.pop(pool.name, None)
        if pool.idle_timer is not None:
            pool.idle_timer.cancel()
        await asyncio.to_thread(kill_group, pool.proc)
        await asyncio.to_thread(kill_workers, pool.log_path)
        pool.pid_path.unlink(missing_ok=True)
        pool.state_path.unlink(missing_ok=True)
        log.info("stopped trainer pool %s", pool.name)

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        return None

    async def close(self) -> None:
        self._placed.clear()
        await asyncio.gather(*(self._stop_pool(p) for p in list(self._pools.values())))

    def pools(self) -> dict[str, list[str]]:
        """Pool name → the runs placed on it (tests, diagnostics)."""
        return {name: sorted(pool.runs) for name, pool in self._pools.items() if pool.alive}


def local_torch_threads(cores: int, ranks: int) -> int:
    """Torch threads per rank of a local pool (unless the user set OMP_NUM_THREADS): the pool's ranks share
    the cores but one, which the gateway and the client on the same machine need. A busy core makes torch's
    OpenMP workers spin at every parallel region's barrier: measured on 2 cores under load, a 1 x 8 forward
    cost the trainer 202 ms of CPU with 2 threads against 11 ms with 1 (wall 753 ms vs 56 ms per op)."""
    return max(1, (cores - 1) // ranks)
