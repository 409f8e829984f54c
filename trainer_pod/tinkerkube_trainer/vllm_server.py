"""The vLLM OpenAI server a `sampler: vllm` pool samples through: started by rank 0 (or reached at a
URL), and the LoRA adapters loaded into it.

Why a separate process and not `import vllm`: vLLM pins a newer transformers than the trainer's venv
can hold, so it lives in its own venv (`vllm_python`) and we speak its HTTP API. Why the trainer
starts it by default: the server must serve exactly the pool's base model directory (built-ins are
materialised by the trainer), read the adapter files the trainer writes on the same filesystem, and
live and die with the pod; a URL (`vllm_url`) is for a sidecar that shares a volume instead.

Adapter names are content addressed (`<run>-<hash of the weights>`): vLLM silently serves the OLD
weights when an adapter name is loaded again with new files, so each weight version must get a
fresh name, and identical weights may share one. The least recently used are unloaded beyond
`max_adapters`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinkerkube_trainer import checkpoints

log = logging.getLogger(__name__)

SERVED_NAME = "base"  # the base model's name inside the server (requests without an adapter)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what --max-lora-rank accepts


@dataclass(frozen=True, slots=True)
class VllmServerConfig:
    """`TrainerSettings.vllm_*`: see docs/configuration.md."""

    url: str | None = None
    python: str = "python3"
    dtype: str = "float32"
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = field(default=None, repr=False)  # the server's whole environment (settings)
    adapter_dir: Path | None = None
    max_adapters: int = 16
    start_timeout_seconds: float = 900.0


class VllmError(RuntimeError):
    """The server refused or failed a request; `status` is its HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the trainer dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def server_command(config: VllmServerConfig, model_dir: str, port: int, max_lora_rank: int,
                   max_loras: int) -> list[str]:
    """The OpenAI server's command line (`vllm serve` is broken in the CPU wheel: use the module)."""
    rank = next((r for r in VLLM_LORA_RANKS if r >= max_lora_rank), VLLM_LORA_RANKS[-1])
    return [config.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", config.dtype, "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_loras, config.max_adapters)), "--disable-log-stats",
            *config.extra_args]


class VllmServer:
    """One vLLM OpenAI server: started here (and stopped at exit) or reached at `config.url`."""

    def __init__(self, config: VllmServerConfig, *, model_dir: str, max_lora_rank: int, max_loras: int = 4) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        if config.url:
            self.url = config.url.rstrip("/")
        else:
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            env = {**(config.env or {}), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
            cmd = server_command(config, model_dir, port, max_lora_rank, max_loras)
            log.info("starting vLLM: %s", " ".join(cmd))
            self.proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
            atexit.register(self.close)
        self._wait_healthy(config.start_timeout_seconds)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with status {self.proc.returncode} while starting "
                                   "(its log is the trainer's stderr)")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the vLLM server at {self.url} was not healthy within {timeout:.0f} s")
            time.sleep(0.5)

    def post(self, path: str, body: Mapping[str, Any], timeout: float = 3600.0) -> Any:
        """POST JSON; the decoded JSON answer (or text), VllmError with the server's message otherwise."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise VllmError(f"vLLM {path} answered {exc.code}: {detail[:2000]}", exc.code) from None
        except OSError as exc:
            raise VllmError(f"vLLM at {self.url} is unreachable: {exc}") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def weights_digest(adapter: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> str:
    """A hash of an adapter's exact bytes and config: its name in vLLM (equal bytes, equal name)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(checkpoints.adapter_config_text(adapter_config).encode())
    for key in sorted(adapter):
        t = adapter[key]
        h.update(key.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Adapters:
    """The adapters loaded into one server, by content-addressed name, least recently used first.

    Thread-safe: sample requests of one pass run concurrently and may need the same adapter."""

    def __init__(self, server: VllmServer, directory: Path | None, max_adapters: int) -> None:
        self.server, self.max_adapters = server, max_adapters
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tinkerkube-vllm-adapters-"))
            atexit.register(shutil.rmtree, self.directory, True)
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def ensure(self, name: str, write: Callable[[Path], None]) -> str:
        """Load adapter `name` (a content-addressed name: see the module doc) unless vLLM holds it;
        `write(directory)` writes its peft files first. Returns `name`."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return name
            path = self.directory / name
            write(path)
            try:
                self.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            except VllmError:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._loaded[name] = path
            while len(self._loaded) > self.max_adapters:
                self._unload(*self._loaded.popitem(last=False))
            return name

    def _unload(self, name: str, path: Path) -> None:
        try:
            self.server.post("/v1/unload_lora_adapter", {"lora_name": name})
        except VllmError as exc:  # unloading is housekeeping: a failure must not fail a sample
            log.warning("could not unload vLLM adapter %s: %s", name, exc)
        shutil.rmtree(path, ignore_errors=True)
