"""Pods as podman containers: the test kubelet's image mode (tests/images).

A Pod's container becomes one `podman run` of its own image, with what a kubelet would give it:
- security: runAsUser/runAsGroup/fsGroup → `--user`/`--group-add`; readOnlyRootFilesystem → `--read-only`
  *without* podman's convenience tmpfs on /tmp, /run and /var/tmp (Kubernetes gives none: a path the pod
  spec does not mount as a volume stays read-only, which is exactly what the tier checks);
  capabilities drop/add → `--cap-drop/--cap-add`; allowPrivilegeEscalation=false → no-new-privileges;
  runAsNonRoot with uid 0 is refused (CreateContainerConfigError);
- command/args: Kubernetes semantics (command replaces the image's ENTRYPOINT, args its CMD);
- volumes: each mount is a host directory chosen by the kubelet (`Mount.source`), a memory-backed
  emptyDir a tmpfs of its sizeLimit;
- env: passed by name only (`-e NAME`), the values travel in podman's own environment, so tokens never
  show on a command line;
- networking: the host's (`--network=host`); the kubelet gives each pod its own 127.x.y.z address.
Resource requests/limits are not applied (a single test node; this host's cgroup v1 layout).

`podman_command` runs podman itself with CONTAINERS_CONF set (tests/images/containers.conf: runc and
explicit ulimits, see docs/operations.md "Image tier").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "tests" / "images" / "containers.conf"
LABEL = "dev.tinkerkube.test-kubelet"


class PodRefused(RuntimeError):
    """The pod cannot start as specified (a kubelet's CreateContainerConfigError)."""


@dataclass(frozen=True, slots=True)
class Mount:
    path: str  # the container's mountPath
    source: str | None = None  # host directory; None: a tmpfs
    tmpfs_size: str | None = None
    read_only: bool = False

    def args(self) -> list[str]:
        if self.source is None:
            size = f":size={self.tmpfs_size}" if self.tmpfs_size else ""
            return ["--tmpfs", f"{self.path}:rw{size}"]
        return ["-v", f"{self.source}:{self.path}:{'ro' if self.read_only else 'rw'}"]


def tmpfs_size(quantity: str | None) -> str | None:
    """A Kubernetes quantity (1Gi, 512Mi, 64M) as a tmpfs size option (1g, 512m, 64m)."""
    if not quantity:
        return None
    units = {"Ki": "k", "Mi": "m", "Gi": "g", "K": "k", "M": "m", "G": "g"}
    for suffix, short in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + short
    return quantity


def user_of(pod_spec: dict[str, Any], container: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(uid, gid, fsGroup): the container's securityContext wins over the pod's, as in Kubernetes."""
    pod_sc = pod_spec.get("securityContext") or {}
    ctr_sc = container.get("securityContext") or {}
    uid = ctr_sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = ctr_sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    return uid, gid, pod_sc.get("fsGroup")


def security_args(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    pod_sc = pod_spec.get("securityContext") or {}
    ctr_sc = container.get("securityContext") or {}
    uid, gid, fs_group = user_of(pod_spec, container)
    non_root = ctr_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if non_root and not uid:
        raise PodRefused("runAsNonRoot needs a non-zero runAsUser (the kubelet cannot verify the image's user)")
    args: list[str] = []
    if uid is not None:
        args.append(f"--user={uid}" + (f":{gid}" if gid is not None else ""))
    if fs_group is not None:
        args.append(f"--group-add={fs_group}")
    if ctr_sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if ctr_sc.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    caps = ctr_sc.get("capabilities") or {}
    args += [f"--cap-drop={c.lower()}" for c in caps.get("drop") or []]
    args += [f"--cap-add={c.lower()}" for c in caps.get("add") or []]
    return args


def volume_mounts(pod_spec: dict[str, Any], container: dict[str, Any], local: dict[str, str]) -> list[Mount]:
    """The container's volumeMounts over the kubelet's host directories (`local`: mountPath → dir).

    emptyDir: a directory anyone may write (as Kubernetes makes it), a tmpfs for medium Memory; PVC: its
    directory, group-owned by the pod's fsGroup (what fsGroup does to a volume); hostPath as it is
    (Kubernetes changes nothing there: making it writable is the cluster operator's job)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    uid, _, fs_group = user_of(pod_spec, container)
    out = []
    for m in container.get("volumeMounts") or []:
        vol = volumes.get(m["name"], {})
        if (vol.get("emptyDir") or {}).get("medium") == "Memory":
            out.append(Mount(m["mountPath"], None, tmpfs_size(vol["emptyDir"].get("sizeLimit"))))
            continue
        path = local[m["mountPath"]]
        if "emptyDir" in vol:
            os.chmod(path, 0o777)
        elif "persistentVolumeClaim" in vol and fs_group is not None:
            os.chown(path, uid if uid is not None else -1, fs_group)
            os.chmod(path, 0o2775)
        out.append(Mount(m["mountPath"], path, read_only=bool(m.get("readOnly"))))
    return out


def run_argv(pod_spec: dict[str, Any], container: dict[str, Any], *, name: str, mounts: list[Mount],
             env_names: list[str], labels: dict[str, str] | None = None) -> list[str]:
    """`podman run` for one container of a pod (see the module docstring for what maps to what)."""
    argv = ["podman", "run", "--rm", f"--name={name}", "--network=host", "--pull=never",
            f"--label={LABEL}=1", *[f"--label={k}={v}" for k, v in (labels or {}).items()],
            *security_args(pod_spec, container)]
    for mount in mounts:
        argv += mount.args()
    for env_name in env_names:
        argv += ["-e", env_name]
    if container.get("workingDir"):
        argv.append(f"--workdir={container['workingDir']}")
    command, args = container.get("command"), list(container.get("args") or [])
    if command:
        argv.append(f"--entrypoint={json.dumps(list(command))}")
    argv.append(container["image"])
    return argv + args


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    env.update(extra or {})
    return env


def podman_command(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def podman_usable() -> str | None:
    """None when podman can run containers here; otherwise why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (make images-test installs it as root on Debian)"
    try:
        podman_command("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"podman does not work here: {exc}"
    return None


def image_exists(image: str) -> bool:
    return podman_command("image", "exists", image, check=False).returncode == 0


def inspect_container(name: str) -> dict[str, Any] | None:
    proc = podman_command("container", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout)
    return found[0] if found else None


def remove_labelled(label_value: str | None = None) -> None:
    """Remove the containers a test kubelet started (all of them, or one kubelet's)."""
    selector = f"label={LABEL}=1" if label_value is None else f"label={LABEL}-id={label_value}"
    names = podman_command("ps", "-a", "--filter", selector, "--format", "{{.Names}}", check=False).stdout.split()
    if names:
        podman_command("rm", "-f", "-t", "2", *names, check=False)
