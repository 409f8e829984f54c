"""Operator scale and status-write bound, against the kmock Kubernetes emulator (no cluster needed).

1. N TrainingSessions (default 200) created at once; the real operator (kopf) reconciles them, and the
   test kubelet marks pods Running+Ready without running a trainer (`run_processes=False`). Prints the
   time until every pod exists and until every session is Ready, against a same-run baseline: one
   session created alone.
2. Status writes per session per second while the gateway's KubernetesBackend mirrors futures at
   `--ops-per-second` (default 50) on one session, against the uncoalesced baseline (one write per call).
   Goal: ≤ 1.1 writes/s.

    .venv/bin/python bench/operator_scale.py [--sessions 200] [--ops-per-second 50] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("crds", "api_gateway", "operator", "trainer_pod")] + [str(ROOT)]

from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess  # noqa: E402
from tests.support.kubelet import Kubelet, KubeletConfig  # noqa: E402
from tinkerkube_contract.resource import (  # noqa: E402
    API_VERSION,
    KIND,
    LABEL_SESSION,
    PLURAL,
    FuturesStatus,
    TrainingSessionSpec,
)
from tinkerkube_gateway.backends.kubernetes import KubernetesBackend  # noqa: E402
from tinkerkube_operator.settings import OperatorSettings  # noqa: E402


def _body(name: str) -> dict[str, object]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
            "spec": {"baseModel": "tinkerkube/tiny-qwen3", "modelId": f"bench:train:{name}", "owner": "bench"}}


def _wait(probe, done, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not done(probe()):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not done after {timeout}s: {probe()!r:.200}")
        time.sleep(0.05)
    return time.monotonic() - start


def create_wave(api: Api, namespace: str, names: list[str], timeout: float) -> tuple[float, float]:
    """Seconds until all pods exist, and until all sessions are Ready, from the first create."""
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: api.create(PLURAL, namespace, _body(n)), names))
    wanted = set(names)

    def pods() -> set[str]:
        return {p["metadata"]["labels"][LABEL_SESSION] for p in api.list("pods", namespace)} & wanted

    def ready() -> int:
        return sum(1 for s in api.list(PLURAL, namespace)
                   if s["metadata"]["name"] in wanted and (s.get("status") or {}).get("phase") == "Ready")

    _wait(pods, lambda got: got == wanted, timeout)
    t_pods = time.monotonic() - start
    _wait(ready, lambda n: n == len(names), timeout)
    return t_pods, time.monotonic() - start


async def mirror_load(url: str, namespace: str, ops_per_second: float,
                      seconds: float) -> tuple[int, int, float, float]:
    backend = KubernetesBackend(api_url=url, namespace=namespace, status_interval_seconds=1.0)
    spec = TrainingSessionSpec(base_model="tinkerkube/tiny-qwen3", model_id="bench:train:mirror", owner="bench")
    await backend.start(spec)
    calls, start = 0, time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        calls += 1
        await backend.mirror_futures(spec.model_id, FuturesStatus(submitted=calls, completed=calls - 1, pending=1,
                                                                  last_seq_id=calls))
        await asyncio.sleep(max(calls / ops_per_second - (time.monotonic() - start), 0))
    await asyncio.sleep(1.5)  # the trailing write lands
    writes, spacing = backend.coalescer.writes, backend.coalescer.min_spacing
    await backend.close()
    return calls, writes, elapsed, spacing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--ops-per-second", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kopf").setLevel(logging.ERROR)
    logging.getLogger("aiohttp.access").setLevel(logging.ERROR)
    with EmulatedCluster(namespaces=("bench", "mirror")) as cluster:
        kubelet = cluster.run(_make_kubelet(cluster.url))
        cluster.submit(kubelet.run())
        settings = OperatorSettings(api_url=cluster.url, standalone=True, metrics_port=0,
                                    auth_token_secret=None, reconcile_interval_seconds=30.0)
        operator = OperatorProcess(cluster, settings)
        operator.start()
        api = Api(cluster.url)
        try:
            _, base_ready = create_wave(api, "bench", ["baseline"], args.timeout)
            names = [f"s{i:04d}" for i in range(args.sessions)]
            t_pods, t_ready = create_wave(api, "bench", names, args.timeout)
            calls, writes, elapsed, spacing = asyncio.run(mirror_load(cluster.url, "mirror", args.ops_per_second,
                                                             args.seconds))
        finally:
            api.close()
            operator.stop()
            cluster.run(kubelet.stop())
    n = args.sessions
    print(f"operator_scale: {n} TrainingSessions created at once (emulated API server, kubelet stand-in)")
    print(f"  all {n} pods exist after      {t_pods:7.2f} s")
    print(f"  all {n} sessions Ready after  {t_ready:7.2f} s   ({n / t_ready:6.1f} sessions/s)")
    print(f"  baseline: 1 session alone Ready after {base_ready:.2f} s;"
          f" {n} at once took {t_ready / base_ready:.1f}x that ({n} x 1 = {n}x if serial)")
    # A leading write at t=0, then at most one per interval, and one trailing write with the last value:
    # over T seconds that is at most floor(T) + 2 writes; the steady rate is 1 / (shortest gap).
    per_s = writes / (elapsed + 1.0)  # the window includes the trailing write, ≤ 1 interval after the load
    steady = 1.0 / spacing
    print(f"status writes under {calls / elapsed:.1f} futures updates/s on one session for {elapsed:.1f} s:")
    print(f"  coalesced: {writes} writes incl. leading+trailing = {per_s:.2f} writes/s over the load + 1 s;"
          f" shortest gap {spacing:.3f} s = {steady:.2f} writes/s steady (goal <= 1.1)")
    print(f"  baseline (one write per update): {calls} writes = {calls / elapsed:.1f} writes/s;"
          f" coalesced/baseline = {writes / calls:.3f}")
    if steady > 1.1 or per_s > 1.1:
        raise SystemExit("status writes per second above the 1.1 goal")


async def _make_kubelet(url: str) -> Kubelet:
    return Kubelet(url, KubeletConfig(run_processes=False))


if __name__ == "__main__":
    main()
