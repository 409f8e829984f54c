"""The local backend's process chores: free ports, recognising our trainer processes, stopping them,
reading the state a previous gateway left. Pure OS plumbing, no placement decisions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class Adopted:
    """A pool process a previous gateway started (not our child): alive while its pid is a trainer."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not is_ours(self.pid):
            self.returncode = -1  # its exit code went to the previous gateway
        return self.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[bytes] | Adopted, grace: float = 5.0) -> None:
    """SIGTERM the pool's process group (a clean stop), SIGKILL it after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def is_ours(pid: int) -> bool:
    """Only kill what is still a trainer (a pid may have been reused since it was recorded)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tinkerkube_trainer" in cmdline or b"fake_trainer" in cmdline


def kill_workers(log_path: Path) -> None:
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
                if is_ours(pid):
                    os.kill(pid, signal.SIGKILL)


def read_state(path: Path) -> dict[str, object] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and {"url", "token", "tenant", "base_model", "runs"} <= set(state) \
        else None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
