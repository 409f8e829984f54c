"""Launch a real trainer process group the way the launchers do, and tear it down.

The argv and environment come from `tinkerkube_contract.launch` (`torchrun_argv` + `trainer_env`),
exactly as the gateway's local backend and the operator use them; only free ports are picked here
(the HTTP port is 0, and rank 0 reports the port it bound through `TINKERKUBE_TRAINER_PORT_FILE`).
Several "pods" are several torchrun processes on 127.0.0.1 with `--nnodes=N` and node ranks 0..N-1.

    with trainer_group(spec, checkpoint_dir=tmp, model_cache_dir=cache, nproc_per_node=2) as group:
        httpx.get(group.url + pod_api.INFO_PATH, headers=group.headers)

Teardown sends SIGTERM to every torchrun (which stops its workers), then SIGKILLs whatever is left:
each torchrun's process group and each worker (torchrun starts workers in sessions of their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinkerkube_contract import pod_api
from tinkerkube_contract.env import PREFIX
from tinkerkube_contract.launch import torchrun_argv, trainer_env
from tinkerkube_contract.resource import TrainingSessionSpec

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [REPO / "crds", REPO / "api_gateway", REPO / "operator", REPO / "trainer_pod", REPO]
PORT_FILE_VAR = PREFIX + "PORT_FILE"
ENGINE_FACTORY_VAR = PREFIX + "ENGINE_FACTORY"
FAKE_ENGINE = "tests.support.fakes:build_fake_engine"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TrainerExited(RuntimeError):
    pass


@dataclass
class TrainerGroup:
    procs: list[subprocess.Popen[bytes]]  # one torchrun per node, node rank = index
    log_paths: list[Path]
    port_file: Path
    token: str | None
    model_id: str
    url: str = ""
    _closed: bool = field(default=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {pod_api.HEADER_TOKEN: self.token} if self.token else {}

    def client(self, timeout: float = 120.0) -> PodClient:
        import httpx

        return PodClient(httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout), self.model_id)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") if p.exists() else "" for p in self.log_paths)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if name is None or doc.get("event") == name:
                        out.append(doc)
        return out

    def worker_pids(self) -> dict[int, int]:
        """{global rank: pid} of the trainer processes, from their `rank started` log lines."""
        return {int(e["rank"]): int(e["pid"]) for e in self.events("rank started")}

    def returncodes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_exited()
            if not self.url and self.port_file.exists() and self.port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
            if self.url:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + pod_api.READY_PATH, timeout=2).status_code == 200:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"trainer not ready within {timeout}s; logs:\n{self.logs()[-4000:]}")

    def wait_exit(self, timeout: float = 60.0) -> list[int | None]:
        """Until every torchrun has exited (or the timeout): their return codes."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return self.returncodes()

    def _raise_if_exited(self) -> None:
        codes = self.returncodes()
        if any(c is not None for c in codes):
            raise TrainerExited(f"trainer exited during startup (codes {codes}); logs:\n{self.logs()[-4000:]}")

    def stop(self, grace: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        workers = list(self.worker_pids().values())
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        self.wait_exit(grace)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class PodClient:
    """A small synchronous client of one trainer's pod API (tests and benchmarks)."""

    http: Any  # httpx.Client
    model_id: str

    def put_op(self, seq_id: int, kind: pod_api.OpKind | str, body: bytes) -> Any:
        kind = pod_api.OpKind(kind)
        ctype = pod_api.CONTENT_PROTOBUF if kind is pod_api.OpKind.FORWARD_BACKWARD else pod_api.CONTENT_JSON
        r = self.http.put(pod_api.op_path(self.model_id, seq_id), content=body,
                          headers={pod_api.HEADER_OP: str(kind), "content-type": ctype})
        if r.status_code not in (200, 202):
            raise AssertionError(f"PUT {kind} seq {seq_id}: {r.status_code} {r.text}")
        return r

    def get_op(self, seq_id: int, wait: float = 0.0) -> Any:
        return self.http.get(pod_api.op_path(self.model_id, seq_id), params={"wait": wait})

    def result(self, seq_id: int, timeout: float = 120.0) -> Any:
        """Long-polls until the op is no longer pending; raises if it failed."""
        return self._result(lambda wait: self.get_op(seq_id, wait), f"seq {seq_id}", timeout)

    def put_sample(self, request_id: str, body: bytes) -> Any:
        r = self.http.put(pod_api.sample_path(request_id), content=body,
                          headers={pod_api.HEADER_OP: "sample", "content-type": pod_api.CONTENT_JSON})
        if r.status_code not in (200, 202):
            raise AssertionError(f"PUT sample {request_id}: {r.status_code} {r.text}")
        return r

    def sample_result(self, request_id: str, timeout: float = 120.0) -> Any:
        get = lambda wait: self.http.get(pod_api.sample_path(request_id), params={"wait": wait})  # noqa: E731
        return self._result(get, f"sample {request_id}", timeout)

    def run(self, seq_id: int, kind: pod_api.OpKind | str, body: bytes, timeout: float = 120.0) -> Any:
        self.put_op(seq_id, kind, body)
        return self.result(seq_id, timeout)

    @staticmethod
    def _result(get: Any, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            r = get(min(pod_api.MAX_WAIT_SECONDS, max(0.0, deadline - time.monotonic())))
            state = r.headers.get(pod_api.HEADER_OP_STATE)
            if state == "complete":
                return r
            if state == "failed" or r.status_code >= 400:
                raise AssertionError(f"{what} failed: {r.status_code} {r.text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} still pending after {timeout}s")

    def close(self) -> None:
        self.http.close()


def launch_env(spec: TrainingSessionSpec, *, checkpoint_dir: Path, model_cache_dir: Path, port_file: Path,
               token: str | None = None, device: str = "cpu", extra_env: Mapping[str, str] | None = None,
               base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base_env is None else base_env)
    env = {k: v for k, v in env.items() if not k.startswith(PREFIX)}  # only what the launcher sets
    paths = [str(p) for p in SOURCE_ROOTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(trainer_env(spec, checkpoint_dir=str(checkpoint_dir), port=0, host="127.0.0.1", auth_token=token,
                           model_cache_dir=str(model_cache_dir), device=device))
    env[PORT_FILE_VAR] = str(port_file)
    env.update(extra_env or {})
    return env


def start_trainer(spec: TrainingSessionSpec, *, checkpoint_dir: Path, model_cache_dir: Path, nnodes: int = 1,
                  nproc_per_node: int = 1, token: str | None = None, log_dir: Path | None = None,
                  extra_env: Mapping[str, str] | None = None, device: str = "cpu",
                  python: str | None = None) -> TrainerGroup:
    """Start the torchrun processes and return at once (call `wait_ready`)."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="trainer-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / "port"
    port_file.unlink(missing_ok=True)
    env = launch_env(spec, checkpoint_dir=checkpoint_dir, model_cache_dir=model_cache_dir, port_file=port_file,
                     token=token, device=device, extra_env=extra_env)
    master_port = free_port()
    procs, logs = [], []
    for node_rank in range(nnodes):
        argv = torchrun_argv(nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank,
                             master_addr="127.0.0.1", master_port=master_port, python=python or sys.executable)
        log_path = log_dir / f"node{node_rank}.log"
        with open(log_path, "wb") as log_file:
            procs.append(subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=str(REPO)))
        logs.append(log_path)
    return TrainerGroup(procs, logs, port_file, token, spec.model_id)


@contextlib.contextmanager
def trainer_group(spec: TrainingSessionSpec, *, ready_timeout: float = 120.0, **kwargs: Any) -> Iterator[TrainerGroup]:
    """A ready trainer process group for the `with` block; always torn down."""
    group = start_trainer(spec, **kwargs)
    try:
        group.wait_ready(ready_timeout)
        yield group
    finally:
        group.stop()
