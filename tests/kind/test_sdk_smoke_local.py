"""The e2e's client script (tests/kind/sdk_smoke.py) proven where no cluster exists: the same script, the real
tinker SDK, against a gateway in local mode (same protocol and trainer entry point; processes, not pods).
So a kind run can only fail on the cluster side, never because the smoke script itself is wrong."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tests" / "kind" / "sdk_smoke.py"
API_KEY = "tml-smoke"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/v1/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"gateway at {url} not healthy within {timeout:.0f} s")


@pytest.fixture
def local_gateway(tmp_path: Path, tiny_model_dir: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "TINKERKUBE_GATEWAY_PORT": str(port),
        "TINKERKUBE_GATEWAY_STATE_DIR": str(tmp_path / "state"),
        "TINKERKUBE_GATEWAY_API_KEYS": f'{{"{API_KEY}": "smoke"}}',
        "TINKERKUBE_GATEWAY_MODEL_CACHE_DIR": str(tiny_model_dir.parent),
        "TINKERKUBE_TRAINER_MODEL_CACHE_DIR": str(tiny_model_dir.parent),
    }
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tinkerkube_gateway.main"], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the gateway stops its trainers on shutdown
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_smoke_script_trains_samples_and_restores_through_the_sdk(local_gateway: str) -> None:
    env = {**os.environ, "TINKER_BASE_URL": local_gateway, "TINKER_API_KEY": API_KEY,
           "E2E_FUTURE_TIMEOUT": "300"}
    proc = subprocess.run([sys.executable, str(SMOKE)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "SDK smoke passed" in proc.stdout
    assert "checkpoint saved and restored into a new run: tinker://" in proc.stdout
