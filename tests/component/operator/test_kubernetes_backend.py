"""The gateway's KubernetesBackend against the emulated API server, with the real operator and the
fake-mode kubelet: start → Ready → handle, failures surfaced, futures mirrored and coalesced, stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.eventually import eventually
from tests.support.kmock_cluster import Api, EmulatedCluster, OperatorProcess
from tests.support.kubelet import Kubelet
from tinkerkube_contract.resource import PLURAL, FuturesStatus, TrainingSessionSpec
from tinkerkube_gateway.backends.base import TrainerStartFailed
from tinkerkube_gateway.backends.kubernetes import KubernetesBackend, resource_name


@pytest.fixture
async def backend(cluster: EmulatedCluster, namespace: str) -> AsyncIterator[KubernetesBackend]:
    b = KubernetesBackend(api_url=cluster.url, namespace=namespace, token="tok", poll_interval_seconds=0.1,
                          recover_timeout_seconds=20)
    yield b
    await b.close()


def _spec(model_id: str, **kw: object) -> TrainingSessionSpec:
    return TrainingSessionSpec(base_model="tinkerkube/tiny-qwen3", model_id=model_id, owner="alice",
                               tinker_session="sess-1", **kw)  # type: ignore[arg-type]


async def test_start_then_wait_ready_gives_the_endpoint(
        backend: KubernetesBackend, api: Api, namespace: str, operator: OperatorProcess) -> None:
    await backend.start(_spec("sess-1:train:0"))
    await backend.start(_spec("sess-1:train:0"))  # idempotent
    handle = await backend.wait_ready("sess-1:train:0", timeout=20)
    assert handle.url.startswith("http://") and handle.url.endswith(":8080") and handle.token == "tok"
    assert await backend.handle("sess-1:train:0") == handle
    assert len(api.list(PLURAL, namespace)) == 1


async def test_a_trainer_that_never_starts_surfaces_as_trainer_start_failed(
        backend: KubernetesBackend, operator: OperatorProcess) -> None:
    await backend.start(_spec("sess-1:train:1", image="crash:latest"))
    with pytest.raises(TrainerStartFailed) as info:
        await backend.wait_ready("sess-1:train:1", timeout=30)
    assert "RetriesExhausted" in info.value.message and not info.value.retryable
    assert await backend.handle("sess-1:train:1") is None
    assert "RetriesExhausted" in backend.exit_reason("sess-1:train:1")


async def test_unschedulable_is_reported_when_the_wait_times_out(
        backend: KubernetesBackend, operator_settings: object, operator: OperatorProcess) -> None:
    await backend.start(_spec("sess-1:train:2", node_selector={"pool": "missing"}))
    with pytest.raises(TrainerStartFailed) as info:
        await backend.wait_ready("sess-1:train:2", timeout=5.0)
    # Unschedulable pods are a capacity wait (the timeout does not run out while the operator says so), so
    # this ends when the operator fails the session (unschedulable_timeout_seconds); a TimeoutError only if
    # the operator never reported anything. Caught pending (retryable) is accepted too.
    assert "Unschedulable" in info.value.message
    assert info.value.retryable or info.value.message.startswith("Failed: Unschedulable")


async def test_handle_waits_through_a_recreation(
        backend: KubernetesBackend, operator: OperatorProcess, kubelet: Kubelet, cluster: EmulatedCluster,
        namespace: str) -> None:
    await backend.start(_spec("sess-1:train:3"))
    first = await backend.wait_ready("sess-1:train:3", timeout=20)
    name = resource_name("sess-1:train:3")
    await cluster.arun(kubelet.fail_pod(namespace, f"{name}-g0-0", exit_code=137))
    await asyncio.sleep(0.5)
    again = await backend.handle("sess-1:train:3")
    assert again is not None and again != first  # a new pod, a new address


async def test_futures_are_mirrored_coalesced_and_the_operator_leaves_them_alone(
        backend: KubernetesBackend, api: Api, namespace: str, operator: OperatorProcess) -> None:
    model = "sess-1:train:4"
    await backend.start(_spec(model))
    await backend.wait_ready(model, timeout=20)
    started, n = time.monotonic(), 0
    while time.monotonic() - started < 3.0:  # ~50 ops/s on one session for 3 s
        n += 1
        await backend.mirror_futures(model, FuturesStatus(submitted=n, completed=n - 1, pending=1, last_seq_id=n))
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.2)  # the trailing write
    obj = await eventually(lambda: asyncio.to_thread(api.get, PLURAL, namespace, resource_name(model)),
                           lambda o: (o["status"].get("futures") or {}).get("submitted") == n, what="last value")
    assert obj["status"]["phase"] == "Ready" and obj["status"]["futures"]["lastSeqId"] == n
    writes = backend.coalescer.writes
    assert n >= 100 and writes <= elapsed / backend.coalescer.interval + 2, (n, writes, elapsed)


async def test_stop_deletes_the_resource_and_its_pods(
        backend: KubernetesBackend, api: Api, namespace: str, operator: OperatorProcess) -> None:
    await backend.start(_spec("sess-1:train:5"))
    await backend.wait_ready("sess-1:train:5", timeout=20)
    await backend.stop("sess-1:train:5")
    await backend.stop("sess-1:train:5")  # idempotent
    await eventually(lambda: asyncio.to_thread(api.list, "pods", namespace), lambda p: p == [], what="pods gone")
    assert await backend.handle("sess-1:train:5") is None
