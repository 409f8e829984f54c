"""The gateway's Kubernetes backend, pure parts: resource names, rendering, and the status coalescer."""

from __future__ import annotations

import asyncio
import re

from tests.unit.contract import crd_schema
from tinkerkube_contract.resource import (
    ANNOTATION_MODEL_ID,
    LABEL_TENANT,
    LABEL_TINKER_SESSION,
    FuturesStatus,
    TrainingSessionSpec,
)
from tinkerkube_gateway.backends.kubernetes import KubernetesBackend, resource_name
from tinkerkube_gateway.backends.status_writes import Coalescer

RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_resource_names_are_rfc1035_unique_and_stable() -> None:
    ids = ["s1:train:0", "S1:TRAIN:0", "x" * 300 + ":sample:7", "a/b/../c", "s1:train:1"]
    names = [resource_name(i) for i in ids]
    assert all(RFC1035.match(n) and len(n) <= 63 for n in names)
    assert len(set(names)) == len(ids) and names == [resource_name(i) for i in ids]


def _backend(**kw: object) -> KubernetesBackend:
    return KubernetesBackend(api_url="http://127.0.0.1:1", namespace="team", **kw)  # type: ignore[arg-type]


def test_rendered_resource_carries_model_id_tenant_and_session_and_is_schema_valid() -> None:
    spec = TrainingSessionSpec(base_model="tiny", model_id="sess 1:train:0", owner="alice@example.com",
                               tinker_session="sess 1")
    body = _backend(trainer_image="reg/t:1", replicas=2, procs_per_pod=2, gpus=1, checkpoint_pvc="ckpt",
                    idle_timeout_seconds=60).render(spec)
    meta = body["metadata"]
    assert meta["annotations"][ANNOTATION_MODEL_ID] == "sess 1:train:0" and meta["namespace"] == "team"
    assert meta["labels"][LABEL_TENANT].startswith("alice-example.com-")
    assert meta["labels"][LABEL_TINKER_SESSION].startswith("sess-1-")
    s = body["spec"]
    assert (s["image"], s["replicas"], s["procsPerPod"], s["resources"]["gpus"]) == ("reg/t:1", 2, 2, 1)
    assert s["checkpointStore"]["pvcName"] == "ckpt" and s["idleTimeoutSeconds"] == 60
    assert crd_schema.errors(body) == []


def test_without_overrides_the_gateway_spec_is_sent_unchanged() -> None:
    spec = TrainingSessionSpec(base_model="tiny", model_id="s:train:0", owner="t", replicas=3)
    assert _backend().render(spec)["spec"] == spec.to_k8s()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Returns once the test has moved the clock far enough."""
        target = self.now + seconds
        while self.now < target:
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for _ in range(5):
                await asyncio.sleep(0)


async def test_coalescer_writes_at_most_once_per_interval_and_the_last_value_wins() -> None:
    clock = FakeClock()
    written: list[tuple[str, int]] = []

    async def write(key: str, value: int) -> None:
        written.append((key, value))

    c = Coalescer(write, 1.0, clock=clock, sleep=clock.sleep)
    for i in range(500):  # 50 offers per simulated second for 10 s
        c.offer("m", i)
        clock.now += 0.02
        await asyncio.sleep(0)
    await clock.advance(2.0)
    values = [v for _, v in written]
    assert values[0] == 0, "the first value is written at once"
    assert values[-1] == 499, "a trailing write carries the last value"
    assert len(values) <= 12, f"{len(values)} writes for 10 s at 50 offers/s"
    assert values == sorted(values)


async def test_coalescer_keeps_sessions_independent() -> None:
    clock = FakeClock()
    written: list[str] = []

    async def write(key: str, value: int) -> None:
        written.append(key)

    c = Coalescer(write, 1.0, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        for i in range(10):
            c.offer("a", i)
            c.offer("b", i)
            await asyncio.sleep(0)
        await clock.advance(0.2)
    await clock.advance(2.0)
    assert written.count("a") == 2 and written.count("b") == 2, written


async def test_flush_writes_what_is_pending_at_once() -> None:
    written: list[int] = []

    async def write(key: str, value: int) -> None:
        written.append(value)

    c = Coalescer(write, 3600.0)
    c.offer("m", 1)
    await asyncio.sleep(0)
    c.offer("m", 2)
    await c.flush()
    assert written == [1, 2]


async def test_a_failing_write_does_not_stop_later_ones() -> None:
    calls: list[int] = []

    async def write(key: str, value: int) -> None:
        calls.append(value)
        if value == 1:
            raise RuntimeError("API server hiccup")

    clock = FakeClock()
    c = Coalescer(write, 1.0, clock=clock, sleep=clock.sleep)
    c.offer("m", 1)
    await asyncio.sleep(0)
    c.offer("m", 2)
    await clock.advance(1.5)
    assert calls == [1, 2]


def test_futures_status_renders_for_the_patch() -> None:
    body = FuturesStatus(submitted=2, pending=1, last_seq_id=5).to_k8s()
    assert body == {"submitted": 2, "completed": 0, "failed": 0, "pending": 1, "lastSeqId": 5, "recent": []}


def test_from_settings_reads_the_gateway_settings_names() -> None:
    from tinkerkube_gateway.settings import GatewaySettings

    settings = GatewaySettings(backend="kubernetes", kube_api_url="http://127.0.0.1:1", namespace="team",
                               trainer_auth_token="s3cret", trainer_image="reg/t:2", trainer_replicas=2,
                               trainer_gpus=1, trainer_memory="8Gi", trainer_node_selector={"pool": "gpu"},
                               trainer_idle_timeout_seconds=900)
    backend = KubernetesBackend.from_settings(settings)
    assert backend.namespace == "team" and backend.token == "s3cret"
    spec = backend.render(TrainingSessionSpec(base_model="tiny", model_id="s:train:0", owner="t"))["spec"]
    assert (spec["image"], spec["replicas"], spec["resources"], spec["nodeSelector"], spec["idleTimeoutSeconds"]) == (
        "reg/t:2", 2, {"gpus": 1, "memory": "8Gi"}, {"pool": "gpu"}, 900)
