"""One gateway replica for multi-replica tests: `python -m tests.support.replica`.

The gateway itself (settings from TINKERKUBE_GATEWAY_*, `compose`, uvicorn) with `SharedBackend`:
fake trainers whose lifetime is not tied to any gateway process and which every replica can reach,
as TrainingSessions are on Kubernetes. Their endpoints live in a shared directory
(TK_SHARED_TRAINERS): `<model>.json` = {url, pid}. Killing a replica leaves its trainers running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import uvicorn

from tinkerkube_contract import launch, pod_api
from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec
from tinkerkube_gateway.app import create_app
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.main import compose
from tinkerkube_gateway.settings import GatewaySettings

SHARED_ENV = "TK_SHARED_TRAINERS"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


class SharedBackend:
    def __init__(self, root: Path, token: str, model_cache_dir: Path):
        self.root, self.token, self.model_cache_dir = root, token, model_cache_dir
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.mirrored: dict[str, FuturesStatus] = {}

    def _path(self, model_id: str, suffix: str = ".json") -> Path:
        return self.root / (re.sub(r"[^A-Za-z0-9._-]", "_", model_id) + suffix)

    def _read(self, model_id: str) -> dict[str, object] | None:
        try:
            return json.loads(self._path(model_id).read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    async def start(self, spec: TrainingSessionSpec) -> None:
        try:
            fd = os.open(self._path(spec.model_id, ".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another replica started it
        os.close(fd)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINKERKUBE_")}
        env.update(launch.trainer_env(spec, checkpoint_dir=str(self.root / "checkpoints"), port=port,
                                      host="127.0.0.1", auth_token=self.token,
                                      model_cache_dir=str(self.model_cache_dir), device="cpu"))
        with open(self._path(spec.model_id, ".log"), "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_trainer"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        tmp = self._path(spec.model_id, ".tmp")
        tmp.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": proc.pid}))
        tmp.rename(self._path(spec.model_id))

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                found = self._read(model_id)
                if found is not None:
                    if not _alive(int(found["pid"])):  # type: ignore[call-overload]
                        raise TrainerStartFailed(f"trainer for {model_id} exited")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{found['url']}{pod_api.READY_PATH}")).status_code == 200:
                            return TrainerHandle(str(found["url"]), self.token)
                await asyncio.sleep(0.1)
        raise TimeoutError(f"trainer for {model_id} not ready")

    async def handle(self, model_id: str) -> TrainerHandle | None:
        found = self._read(model_id)
        if found is None or not _alive(int(found["pid"])):  # type: ignore[call-overload]
            return None
        return TrainerHandle(str(found["url"]), self.token)

    async def stop(self, model_id: str) -> None:
        found = self._read(model_id)
        if found is not None:
            with contextlib.suppress(OSError):
                os.killpg(int(found["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            self._path(model_id).unlink(missing_ok=True)

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        self.mirrored[model_id] = futures

    async def close(self) -> None:
        return None  # trainers outlive a gateway replica (the test kills them)


def kill_trainers(root: Path) -> None:
    for path in root.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.killpg(int(json.loads(path.read_text())["pid"]), signal.SIGKILL)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    backend = SharedBackend(Path(os.environ[SHARED_ENV]), settings.kube_token or "test-token",
                            settings.model_cache_dir.resolve())
    app = create_app(lambda: compose(settings, backend))  # type: ignore[arg-type]
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
