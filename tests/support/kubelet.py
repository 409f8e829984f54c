"""A test kubelet for the emulated cluster: it watches Pods and runs each one's container command as
a local process (KubeRay's updateHeadPodToRunningAndReady, but with the real command).

What a node would do, emulated:
- scheduling: a pod whose nodeSelector or nvidia.com/gpu request this "node" cannot meet stays Pending
  with PodScheduled=False/Unschedulable; an image listed in `pull_fail_images` waits in ImagePullBackOff;
- networking: each pod gets its own loopback address 127.A.B.N (A, B random per kubelet) as podIP;
  the trainer's HOST env is that address, so every rank 0 serves TRAINER_PORT without clashing;
  `--master_addr=<pod DNS>` resolves to the named pod's address and `--master_port` is rewritten to
  a free port per pod set (torch's store listens on all interfaces);
- images: the image's `python` is this interpreter (`sys.executable`), with the repo on PYTHONPATH;
  or, with `podman=True` (the image tier), each container is a real `podman run` of its image with the
  pod's user, read-only root, capabilities and volumes (tests/support/podman.py);
- volumes: hostPath → that path, PVC → `pvc_paths[claim]`, emptyDir → a temp dir; env values under a
  mountPath are rewritten to the local path (podman mode mounts them at the mountPath instead);
  secretKeyRef env is read from the API, fieldRef (metadata.name/namespace, status.podIP) filled in;
- status: podIP, phase, PodScheduled/Ready conditions (Ready when the readiness probe answers 200, at
  once without one),
  container state running/terminated with the exit code;
- deletion: the process tree is terminated (SIGTERM, then SIGKILL).
With `run_processes=False` nothing runs: pods become Running and Ready at once (benchmarks, operator
component tests), and `fail_pod` makes one "exit".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support import podman

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [REPO / "crds", REPO / "api_gateway", REPO / "operator", REPO / "trainer_pod", REPO]
MERGE = {"content-type": "application/merge-patch+json"}
HOST_ENV = "TINKERKUBE_TRAINER_HOST"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class KubeletConfig:
    run_processes: bool = True
    python: str = "python"
    node_name: str = "kmock-node-1"
    node_labels: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    pull_fail_images: set[str] = field(default_factory=set)
    crash_images: set[str] = field(default_factory=set)  # fake mode: these exit 1 right after start
    pvc_paths: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    probe_interval: float = 0.2
    grace_seconds: float = 5.0
    podman: bool = False  # run each container from its image with podman (tests/images) instead of locally


@dataclass
class RunningPod:
    namespace: str
    name: str
    ip: str
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    log_path: Path | None = None
    ready: bool = False
    container_name: str | None = None  # podman mode


class Kubelet:
    def __init__(self, api_url: str, config: KubeletConfig | None = None) -> None:
        self.api = httpx.AsyncClient(base_url=api_url, timeout=30)
        self.config = config or KubeletConfig()
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self._net = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."
        self._next_ip = 2
        self._dns: dict[str, str] = {}  # "<hostname>.<subdomain>.<ns>" → pod IP
        self._master_ports: dict[str, int] = {}
        self._log_dir = Path(self.config.log_dir or tempfile.mkdtemp(prefix="kubelet-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.id = f"k{random.randint(0, 16**6):06x}"  # names and labels of this kubelet's containers

    # --- the watch loop -------------------------------------------------------------------------
    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    await self._watch_once()
                await asyncio.sleep(0.2)
        finally:
            await asyncio.shield(self.shutdown())

    async def _watch_once(self) -> None:
        async with self.api.stream("GET", "/api/v1/pods", params={"watch": "true"}, timeout=None) as resp:
            async for line in resp.aiter_lines():
                if line.strip():
                    event = json.loads(line)
                    await self._on_event(event.get("type", ""), event.get("object") or {})

    async def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if key in self.pods:
                await self._stop(self.pods.pop(key))
        elif key not in self.pods and (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded"):
            running = RunningPod(key[0], key[1], self._allocate_ip())
            self.pods[key] = running
            spec = pod.get("spec") or {}
            if spec.get("hostname") and spec.get("subdomain"):
                self._dns[f"{spec['hostname']}.{spec['subdomain']}.{key[0]}"] = running.ip
            running.task = asyncio.create_task(self._lifecycle(running, pod))

    def _allocate_ip(self) -> str:
        ip = f"{self._net}{self._next_ip}"
        self._next_ip = self._next_ip + 1 if self._next_ip < 254 else 2
        return ip

    # --- one pod ---------------------------------------------------------------------------------
    async def _lifecycle(self, rp: RunningPod, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        why = self._unschedulable(pod)
        if why:
            await self._patch(rp, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
                 "lastTransitionTime": _now()}]})
            return
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
        if container.get("image") in self.config.pull_fail_images:
            await self._patch(rp, {"phase": "Pending", "hostIP": "127.0.0.1", "podIP": rp.ip,
                                   "conditions": [scheduled], "containerStatuses": [_state(container, {"waiting": {
                                       "reason": "ImagePullBackOff",
                                       "message": f"Back-off pulling image {container['image']!r}"}})]})
            return
        if not self.config.run_processes:
            await self._fake_run(rp, container, scheduled)
            return
        await self._real_run(rp, pod, container, scheduled)

    async def _fake_run(self, rp: RunningPod, container: dict[str, Any], scheduled: dict[str, Any]) -> None:
        crashing = container.get("image") in self.config.crash_images
        await self._patch(rp, _running(rp, container, scheduled, ready=not crashing))
        if crashing:
            await self.fail_pod(rp.namespace, rp.name, exit_code=1)

    async def _real_run(self, rp: RunningPod, pod: dict[str, Any], container: dict[str, Any],
                        scheduled: dict[str, Any]) -> None:
        if self.config.podman:
            try:
                argv, env = await self._podman_run(rp, pod, container)
            except podman.PodRefused as exc:
                await self._patch(rp, {"phase": "Pending", "conditions": [scheduled], "containerStatuses": [
                    _state(container, {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}})]})
                return
        else:
            argv = await self._argv(rp, container)
            env = await self._env(rp, pod, container)
        rp.log_path = self._log_dir / f"{rp.namespace}_{rp.name}.log"
        with open(rp.log_path, "wb") as log:
            rp.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                cwd=str(REPO))
        await self._patch(rp, _running(rp, container, scheduled, ready=False))
        probe = asyncio.create_task(self._probe(rp, container, scheduled))
        try:
            code = await rp.proc.wait()
        finally:
            probe.cancel()
        await self._patch(rp, _terminated(rp, container, scheduled, code))

    async def _probe(self, rp: RunningPod, container: dict[str, Any], scheduled: dict[str, Any]) -> None:
        get = (container.get("readinessProbe") or {}).get("httpGet")
        if get is None:  # no readiness probe: Ready once running
            rp.ready = True
            await self._patch(rp, _running(rp, container, scheduled, ready=True))
            return
        port = get.get("port", 8080)
        if isinstance(port, str):  # a named container port
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        url = f"http://{rp.ip}:{port}{get.get('path', '/')}"
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                ok = False
                with contextlib.suppress(httpx.HTTPError):
                    ok = (await client.get(url)).status_code == 200
                if ok != rp.ready:
                    rp.ready = ok
                    await self._patch(rp, _running(rp, container, scheduled, ready=ok))
                await asyncio.sleep(self.config.probe_interval)

    def _unschedulable(self, pod: dict[str, Any]) -> str | None:
        spec = pod.get("spec") or {}
        wanted = spec.get("nodeSelector") or {}
        if any(self.config.node_labels.get(k) != v for k, v in wanted.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        requests = (spec["containers"][0].get("resources") or {}).get("requests") or {}
        if int(requests.get("nvidia.com/gpu", 0)) > self.config.gpus:
            return "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        return None

    async def _argv(self, rp: RunningPod, container: dict[str, Any], *, local_python: bool = True) -> list[str]:
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if argv and argv[0] == self.config.python and local_python:
            argv[0] = sys.executable
        master = next((a.split("=", 1)[1] for a in argv if a.startswith("--master_addr=")), None)
        out = []
        for arg in argv:
            if arg.startswith("--master_addr=") and master:
                arg = f"--master_addr={await self._resolve(master)}"
            elif arg.startswith("--master_port=") and master:
                arg = f"--master_port={self._master_ports.setdefault(master, free_port())}"
            out.append(arg)
        return out

    async def _resolve(self, dns: str) -> str:
        key = ".".join(dns.split(".")[:3])  # hostname.subdomain.namespace(.svc.cluster.local)
        for _ in range(300):
            if key in self._dns:
                return self._dns[key]
            await asyncio.sleep(0.1)
        raise RuntimeError(f"cannot resolve {dns}")

    async def _env(self, rp: RunningPod, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINKERKUBE_")}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in SOURCE_ROOTS)
        env["PYTHONUNBUFFERED"] = "1"
        mounts = self._mounts(rp, pod, container)
        for name, value in (await self._container_env(rp, pod, container)).items():
            # One rewrite per value, the deepest mount first: a rewritten path may itself lie under
            # another mountPath (a host temp dir under the pod's /tmp emptyDir).
            for mount_path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    value = local + value[len(mount_path):]
                    break
            env[name] = value
        env[HOST_ENV] = rp.ip
        env.update(self.config.extra_env)
        return env

    async def _container_env(self, rp: RunningPod, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container's env list resolved: values, secretKeyRef from the API, fieldRef from the pod."""
        fields = {"metadata.name": rp.name, "metadata.namespace": rp.namespace, "status.podIP": rp.ip,
                  "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default")}
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            value = item.get("value")
            source = item.get("valueFrom") or {}
            if "secretKeyRef" in source:
                value = await self._secret(rp.namespace, source["secretKeyRef"])
            elif "fieldRef" in source:
                value = fields[source["fieldRef"]["fieldPath"]]
            if value is not None:
                env[item["name"]] = value
        return env

    async def _podman_run(self, rp: RunningPod, pod: dict[str, Any],
                          container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """argv and environment of `podman run` for this pod (see tests/support/podman.py)."""
        command = await self._argv(rp, container, local_python=False)
        env = {**await self._container_env(rp, pod, container), HOST_ENV: rp.ip, **self.config.extra_env}
        rp.container_name = f"{self.id}-{rp.namespace}-{rp.name}"[:200]
        spec = dict(container, command=command, args=[])
        argv = podman.run_argv(pod["spec"], spec, name=rp.container_name, env_names=sorted(env),
                               mounts=podman.volume_mounts(pod["spec"], container, self._mounts(rp, pod, container)),
                               labels={f"{podman.LABEL}-id": self.id})
        return argv, podman.podman_env(env)

    def _mounts(self, rp: RunningPod, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out = {}
        for m in container.get("volumeMounts") or []:
            vol = volumes.get(m["name"], {})
            if "hostPath" in vol:
                local = vol["hostPath"]["path"]
            elif "persistentVolumeClaim" in vol:
                local = self.config.pvc_paths.get(vol["persistentVolumeClaim"]["claimName"]) or ""
            else:
                local = ""
            if not local:
                local = tempfile.mkdtemp(prefix=f"{rp.name}-{m['name']}-", dir=self._log_dir)
            Path(local).mkdir(parents=True, exist_ok=True)
            out[m["mountPath"]] = local
        return out

    async def _secret(self, namespace: str, ref: dict[str, Any]) -> str | None:
        resp = await self.api.get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
        if resp.status_code != 200:
            if ref.get("optional"):
                return None
            raise RuntimeError(f"secret {namespace}/{ref['name']} not found (CreateContainerConfigError)")
        secret = resp.json()
        if ref["key"] in (secret.get("stringData") or {}):
            return str(secret["stringData"][ref["key"]])
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    async def _patch(self, rp: RunningPod, status: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.api.patch(f"/api/v1/namespaces/{rp.namespace}/pods/{rp.name}/status",
                                 json={"status": status}, headers=MERGE)

    # --- test controls -----------------------------------------------------------------------------
    async def fail_pod(self, namespace: str, name: str, *, exit_code: int = 1, reason: str = "Error") -> None:
        """Fake mode: the pod's container exits with `exit_code`. Real mode: its process tree is killed."""
        rp = self.pods.get((namespace, name))
        if rp is None:
            raise KeyError(f"no pod {namespace}/{name} on this kubelet")
        if rp.container_name is not None:
            await _podman("kill", rp.container_name)
            return
        if rp.proc is not None:
            _kill_tree(rp.proc.pid, signal.SIGKILL)
            return
        container = {"name": "trainer"}
        scheduled = {"type": "PodScheduled", "status": "True"}
        await self._patch(rp, _terminated(rp, container, scheduled, exit_code, reason=reason))

    def kill_worker(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Kill one trainer process (a torchrun worker) of a pod, as a crash would; returns its pid."""
        rp = self.pods[(namespace, name)]
        assert rp.proc is not None and not self.config.podman, "kill_worker needs local processes"
        children = psutil.Process(rp.proc.pid).children(recursive=True)
        victim = next(c for c in children if "tinkerkube_trainer" in " ".join(c.cmdline()))
        victim.send_signal(sig)
        return victim.pid

    def logs(self, namespace: str, name: str) -> str:
        rp = self.pods.get((namespace, name))
        path = rp.log_path if rp else next(iter(self._log_dir.glob(f"{namespace}_{name}.log")), None)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def live_processes(self) -> list[int]:
        return [rp.proc.pid for rp in self.pods.values() if rp.proc is not None and rp.proc.returncode is None]

    async def _stop(self, rp: RunningPod) -> None:
        if rp.container_name is not None and rp.proc is not None and rp.proc.returncode is None:
            # SIGTERM, SIGKILL after the grace period, as a kubelet does; --rm removes it.
            await _podman("stop", "-t", str(int(self.config.grace_seconds)), rp.container_name)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rp.proc.wait(), 30)
        if rp.proc is not None and rp.proc.returncode is None:
            tree = _tree(rp.proc.pid)
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)
            _, alive = await asyncio.to_thread(psutil.wait_procs, tree, self.config.grace_seconds)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rp.proc.wait(), 5)  # reap it on this loop
        if rp.task is not None:
            rp.task.cancel()

    async def stop(self) -> None:
        """Stop watching and end every process this kubelet started."""
        task = getattr(self, "_task", None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            await self.shutdown()

    async def shutdown(self) -> None:
        for key in list(self.pods):
            await self._stop(self.pods.pop(key))
        await self.api.aclose()


async def _podman(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("podman", *args, env=podman.podman_env(),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _kill_tree(pid: int, sig: int) -> None:
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _state(container: dict[str, Any], state: dict[str, Any], *, ready: bool = False) -> dict[str, Any]:
    return {"name": container.get("name", "trainer"), "image": container.get("image", ""), "ready": ready,
            "restartCount": 0, "state": state}


def _running(rp: RunningPod, container: dict[str, Any], scheduled: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    flag = "True" if ready else "False"
    return {"phase": "Running", "hostIP": "127.0.0.1", "podIP": rp.ip, "startTime": _now(),
            "conditions": [scheduled, {"type": "Ready", "status": flag, "lastTransitionTime": _now()},
                           {"type": "ContainersReady", "status": flag}],
            "containerStatuses": [_state(container, {"running": {"startedAt": _now()}}, ready=ready)]}


def _terminated(rp: RunningPod, container: dict[str, Any], scheduled: dict[str, Any], code: int, *,
                reason: str | None = None) -> dict[str, Any]:
    exit_code = 128 - code if code < 0 else code  # killed by signal N → 128+N, as a container runtime reports
    why = reason or ("Completed" if exit_code == 0 else "Error")
    return {"phase": "Succeeded" if exit_code == 0 else "Failed", "podIP": rp.ip,
            "conditions": [scheduled, {"type": "Ready", "status": "False", "lastTransitionTime": _now()}],
            "containerStatuses": [_state(container, {"terminated": {
                "exitCode": exit_code, "reason": why, "finishedAt": _now()}})]}
