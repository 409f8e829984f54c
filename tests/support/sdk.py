"""Gateway processes for component tests: a real uvicorn on a free port, driven by the real tinker SDK.

`start_gateway` runs `python -m tinkerkube_gateway.main` as a subprocess configured only through
TINKERKUBE_GATEWAY_* variables; trainers are the fake trainer (tests.support.fake_trainer) unless
`real_trainer=True`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
FAKE_TRAINER = [sys.executable, "-m", "tests.support.fake_trainer"]
DEV_KEY = "tml-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProc:
    url: str
    state_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def http(self, key: str = DEV_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key}, timeout=60)

    def stop(self, *, kill: bool = False, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def trainer_pids(self) -> dict[str, int]:
        """Trainer pool name → its process id (the local backend's pid files)."""
        logs = self.state_dir / "logs"
        return {p.stem: int(p.read_text()) for p in logs.glob("*.pid")}

    def pools(self) -> dict[str, list[str]]:
        """Trainer pool name → the runs (and samplers) placed on it (the local backend's state files)."""
        logs = self.state_dir / "logs"
        out = {}
        for path in logs.glob("*.pool.json"):
            try:
                out[path.name.removesuffix(".pool.json")] = sorted(json.loads(path.read_text())["runs"])
            except (OSError, ValueError, KeyError):
                continue  # being replaced right now
        return out


def start_gateway(state_dir: Path, *, model_cache_dir: Path, real_trainer: bool = False,
                  extra_env: dict[str, str] | None = None, port: int | None = None,
                  module: str = "tinkerkube_gateway.main") -> GatewayProc:
    port = port or free_port()
    env = dict(os.environ)
    env.update({
        "TINKERKUBE_GATEWAY_HOST": "127.0.0.1",
        "TINKERKUBE_GATEWAY_PORT": str(port),
        "TINKERKUBE_GATEWAY_STATE_DIR": str(state_dir),
        "TINKERKUBE_GATEWAY_MODEL_CACHE_DIR": str(model_cache_dir),
        "TINKERKUBE_GATEWAY_TRAINER_DEVICE": "cpu",
        "TINKER_TELEMETRY": "0",
    })
    if not real_trainer:
        env["TINKERKUBE_GATEWAY_TRAINER_COMMAND"] = json.dumps(FAKE_TRAINER)
    env.update(extra_env or {})
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"gateway-{port}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    gw = GatewayProc(f"http://127.0.0.1:{port}", state_dir, env, proc, log_path, dict(extra_env or {}))
    deadline = time.monotonic() + 90  # a loaded 2-core machine imports the gateway slowly
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        try:
            if httpx.get(gw.url + "/api/v1/healthz", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            gw.stop(kill=True)
            raise RuntimeError(f"gateway not healthy within 90s:\n{gw.log()}")
        time.sleep(0.1)


def metric_value(gw: GatewayProc, name: str, **labels: str) -> float:
    """The value of the gateway's metric sample `name` whose labels include `labels` (0 when there is none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0
