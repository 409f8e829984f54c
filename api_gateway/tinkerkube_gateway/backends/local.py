"""LocalBackend: trainer pools on this machine (the embedded default).

A pool is one trainer process group (`python -m torch.distributed.run ... -m tinkerkube_trainer.main`,
contract `launch.torchrun_argv` + `launch.pool_env`) holding one base model resident, on 127.0.0.1
with a free port and the gateway's random trainer token, in its own process group (so stopping it
kills every rank), logging to `<state>/logs/<pool>.log`. Every run (and every sampler) of a tenant
and base model is attached to a pool of that tenant and base model with a free slot (a new pool is
started when none has one), so a second client on a warm pool costs an attach, not a model load.
Tenants never share a pool unless `share_pools_across_tenants` says so. A pool whose last run left
stops after `pool_idle_seconds`. A pid file per pool lets a restarted gateway kill orphans.
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
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinkerkube_contract import env as contract_env
from tinkerkube_contract import launch
from tinkerkube_contract.pod_api import RunInfo, RunSpec, RunState
from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
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
    model_aliases: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # replaces torchrun (tests' fake trainer)
    pool_max_runs: int = 8
    pool_max_lora_rank: int = 512
    pool_idle_seconds: float = 300.0
    share_pools_across_tenants: bool = False


@dataclass(eq=False)
class _Pool:
    name: str
    key: tuple[str, str]  # (tenant or SHARED, base model)
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    pid_path: Path
    runs: dict[str, TrainingSessionSpec] = field(default_factory=dict)  # placed here (attaching or attached)
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def state_path(self) -> Path:
        return self.pid_path.with_suffix(".pool.json")

    def write_state(self) -> None:
        """Where the pool listens and what it holds, beside its pid file (diagnostics, orphan handling)."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.proc.pid, "url": self.url, "tenant": self.key[0],
                                   "base_model": self.key[1], "runs": sorted(self.runs)}))
        tmp.replace(self.state_path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def run_spec(spec: TrainingSessionSpec) -> RunSpec:
    return RunSpec(model_id=spec.model_id, base_model=spec.base_model, mode=spec.mode, lora=spec.lora,
                   restore_from=spec.restore_from, restore_optimizer=spec.restore_optimizer)


class LocalBackend:
    def __init__(self, config: LocalBackendConfig, pod_client: PodClient):
        self._config = config
        self._pods = pod_client
        self._pools: dict[str, _Pool] = {}
        self._placed: dict[str, _Pool] = {}  # model_id → the pool it is attached to
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._kill_orphans()

    def _kill_orphans(self) -> None:
        for pid_file in self._config.logs_dir.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pid_file.read_text().strip())
                if _is_ours(pid):
                    os.killpg(pid, signal.SIGKILL)
                    log.warning("killed orphan trainer pool %s from a previous gateway", pid_file.stem)
            _kill_workers(pid_file.with_suffix(".log"))
            pid_file.unlink(missing_ok=True)
            pid_file.with_suffix(".pool.json").unlink(missing_ok=True)

    # ---- placement ---------------------------------------------------------------------------------

    def _key(self, spec: TrainingSessionSpec) -> tuple[str, str]:
        return (SHARED if self._config.share_pools_across_tenants else spec.owner, spec.base_model)

    def _pool_with_room(self, key: tuple[str, str]) -> _Pool | None:
        for pool in self._pools.values():
            if pool.key == key and pool.alive and len(pool.runs) < self._config.pool_max_runs:
                return pool
        return None

    def _start_pool(self, key: tuple[str, str]) -> _Pool:
        cfg = self._config
        name = _safe(f"pool-{key[0]}-{key[1]}-{os.getpid()}-{next(self._numbers)}")
        port = free_port()
        argv = list(cfg.command) if cfg.command else launch.torchrun_argv(
            nnodes=1, nproc_per_node=cfg.nproc_per_node, node_rank=0, master_addr="127.0.0.1",
            master_port=free_port())
        env = {k: v for k, v in cfg.base_env.items() if not k.startswith(contract_env.PREFIX)}  # launcher's only
        # torchrun would pin each rank to one thread; a pool is this machine's one trainer, so its ranks share
        # the cores (unless the user chose a thread count).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
        env.update(launch.pool_env(
            key[1], checkpoint_dir=str(cfg.checkpoint_dir), port=port, host="127.0.0.1", auth_token=cfg.token,
            model_cache_dir=str(cfg.model_cache_dir), model_aliases=cfg.model_aliases or None, device=cfg.device,
            max_runs=cfg.pool_max_runs, max_lora_rank=cfg.pool_max_lora_rank))
        log_path = cfg.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        pid_path = cfg.logs_dir / f"{name}.pid"
        pid_path.write_text(str(proc.pid))
        pool = self._pools[name] = _Pool(name, key, proc, f"http://127.0.0.1:{port}", log_path, pid_path)
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
        handle = TrainerHandle(pool.url, self._config.token)
        while not await self._pods.ready(pool.url, self._config.token):
            self._check_alive(pool, model_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer pool for {model_id} not ready within {timeout:.0f}s (log {pool.log_path})")
            await asyncio.sleep(0.2)
        info = await self._attach(pool, handle, model_id)
        while info.state is RunState.ATTACHING:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{model_id} not attached within {timeout:.0f}s (log {pool.log_path})")
            info = await self._pods.info(handle, model_id, wait=min(remaining, 10.0))
        if info.state is RunState.FAILED:
            raise TrainerStartFailed(f"{model_id} could not start on its trainer pool: {info.error}")
        return handle

    async def _attach(self, pool: _Pool, handle: TrainerHandle, model_id: str) -> RunInfo:
        try:
            return await self._pods.attach(handle, run_spec(pool.runs[model_id]))
        except OpRejected as exc:
            raise TrainerStartFailed(f"{model_id} could not attach to its trainer pool: {exc.detail}",
                                     retryable=exc.status == 429) from exc
        except TrainerUnreachable:
            self._check_alive(pool, model_id)
            raise

    def _check_alive(self, pool: _Pool, model_id: str) -> None:
        code = pool.proc.poll()
        if code is not None:
            raise TrainerStartFailed(f"the trainer pool for {model_id} exited with code {code} while starting; "
                                     f"last log lines:\n{_tail(pool.log_path)}", retryable=False)

    async def handle(self, model_id: str) -> TrainerHandle | None:
        pool = self._placed.get(model_id)
        if pool is None or not pool.alive:
            return None
        return TrainerHandle(pool.url, self._config.token)

    def exit_reason(self, model_id: str) -> str:
        pool = self._placed.get(model_id)
        if pool is None:
            return f"no trainer is running for {model_id}"
        return f"its trainer pool exited with code {pool.proc.poll()}; last log lines:\n{_tail(pool.log_path)}"

    # ---- leaving -----------------------------------------------------------------------------------

    async def stop(self, model_id: str) -> None:
        pool = self._placed.pop(model_id, None)
        if pool is None:
            return
        pool.runs.pop(model_id, None)
        pool.write_state()
        if pool.alive:
            with contextlib.suppress(TrainerUnreachable, OpRejected):
                await self._pods.detach(TrainerHandle(pool.url, self._config.token), model_id)
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
        await asyncio.to_thread(_kill_group, pool.proc)
        await asyncio.to_thread(_kill_workers, pool.log_path)
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


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


def _is_ours(pid: int) -> bool:
    """Only kill what is still a trainer (a pid may have been reused since it was recorded)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tinkerkube_trainer" in cmdline or b"fake_trainer" in cmdline


def _kill_workers(log_path: Path) -> None:
    """torchrun starts each rank in a session of its own, so killing torchrun's group can miss them; each
    rank logs a JSON `rank started` line with its pid."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if line.startswith("{") and '"rank started"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError, PermissionError):
                pid = int(json.loads(line)["pid"])
                if _is_ours(pid):
                    os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
