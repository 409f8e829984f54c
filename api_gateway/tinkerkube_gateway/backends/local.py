"""LocalBackend: one trainer process group per run on this machine (the embedded default).

Each trainer is `python -m torch.distributed.run ... -m tinkerkube_trainer.main` (contract
`launch.torchrun_argv` + `launch.trainer_env`) on 127.0.0.1 with free ports and the gateway's random
trainer token, in its own process group (so stop kills every rank), logging to
`<state>/logs/<model>.log`. A pid file per trainer lets a restarted gateway kill orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.clients.pod_client import PodClient

log = logging.getLogger(__name__)


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


@dataclass
class _Trainer:
    spec: TrainingSessionSpec
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    pid_path: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


class LocalBackend:
    def __init__(self, config: LocalBackendConfig, pod_client: PodClient):
        self._config = config
        self._pods = pod_client
        self._trainers: dict[str, _Trainer] = {}
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._kill_orphans()

    def _kill_orphans(self) -> None:
        for pid_file in self._config.logs_dir.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pid_file.read_text().strip())
                if _is_ours(pid):
                    os.killpg(pid, signal.SIGKILL)
                    log.warning("killed orphan trainer %s from a previous gateway", pid_file.stem)
            _kill_workers(pid_file.with_suffix(".log"))
            pid_file.unlink(missing_ok=True)

    def _argv_env(self, spec: TrainingSessionSpec, port: int) -> tuple[list[str], dict[str, str]]:
        cfg = self._config
        argv = list(cfg.command) if cfg.command else launch.torchrun_argv(
            nnodes=1, nproc_per_node=cfg.nproc_per_node, node_rank=0, master_addr="127.0.0.1",
            master_port=free_port())
        env = {k: v for k, v in cfg.base_env.items() if not k.startswith(contract_env.PREFIX)}  # launcher's only
        env.update(launch.trainer_env(
            spec, checkpoint_dir=str(cfg.checkpoint_dir), port=port, host="127.0.0.1", auth_token=cfg.token,
            model_cache_dir=str(cfg.model_cache_dir), model_aliases=cfg.model_aliases or None, device=cfg.device))
        return argv, env

    async def start(self, spec: TrainingSessionSpec) -> None:
        current = self._trainers.get(spec.model_id)
        if current is not None and current.proc.poll() is None:
            return
        port = free_port()
        argv, env = self._argv_env(spec, port)
        name = _safe(spec.model_id)
        log_path = self._config.logs_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        pid_path = self._config.logs_dir / f"{name}.pid"
        pid_path.write_text(str(proc.pid))
        self._trainers[spec.model_id] = _Trainer(spec, proc, f"http://127.0.0.1:{port}", log_path, pid_path)
        log.info("started trainer %s (pid %d, port %d, log %s)", spec.model_id, proc.pid, port, log_path)

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        trainer = self._trainers.get(model_id)
        if trainer is None:
            raise TrainerStartFailed(f"no trainer was started for {model_id}")
        deadline = time.monotonic() + timeout
        while True:
            code = trainer.proc.poll()
            if code is not None:
                raise TrainerStartFailed(f"trainer for {model_id} exited with code {code} while starting; "
                                         f"last log lines:\n{_tail(trainer.log_path)}", retryable=False)
            if await self._pods.ready(trainer.url, self._config.token):
                return TrainerHandle(trainer.url, self._config.token)
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer for {model_id} not ready within {timeout:.0f}s (log {trainer.log_path})")
            await asyncio.sleep(0.2)

    async def handle(self, model_id: str) -> TrainerHandle | None:
        trainer = self._trainers.get(model_id)
        if trainer is None or trainer.proc.poll() is not None:
            return None
        return TrainerHandle(trainer.url, self._config.token)

    def exit_reason(self, model_id: str) -> str:
        trainer = self._trainers.get(model_id)
        if trainer is None:
            return f"no trainer is running for {model_id}"
        code = trainer.proc.poll()
        return f"trainer for {model_id} exited with code {code}; last log lines:\n{_tail(trainer.log_path)}"

    async def stop(self, model_id: str) -> None:
        trainer = self._trainers.pop(model_id, None)
        if trainer is not None:
            await asyncio.to_thread(_kill_group, trainer.proc)
            await asyncio.to_thread(_kill_workers, trainer.log_path)
            trainer.pid_path.unlink(missing_ok=True)

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        return None

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in list(self._trainers)))


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
