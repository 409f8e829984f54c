"""Sampling backpressure (services/admission.py): who starts, who waits and why, who gets a 429."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

import pytest

from tinkerkube_gateway.errors import Backpressure
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.admission import AdmissionLimits, SampleAdmission, Ticket
from tinkerkube_gateway.services.futures import QueueState
from tinkerkube_gateway.store.records import FutureRecord, FutureState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """Samples that run until the test lets them finish, with the tokens the test says they used."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.tasks: list[asyncio.Task[None]] = []
        self.admission = SampleAdmission(limits, self.metrics, self._spawn, clock=self.clock)
        self.started: list[str] = []
        self.waited: dict[str, bool] = {}
        self._release: dict[str, asyncio.Future[int]] = {}

    def _spawn(self, coro: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def submit(self, request_id: str, tenant: str = "a", pool: str = "p", cost: int = 10) -> None:
        self.admission.check(tenant, pool)

        async def run(waited: bool) -> int:
            self.started.append(request_id)
            self.waited[request_id] = waited
            self._release[request_id] = asyncio.get_running_loop().create_future()
            return await self._release[request_id]

        self.admission.admit(Ticket(request_id, tenant, pool, cost, run))

    async def finish(self, request_id: str, used: int = 0) -> None:
        await asyncio.sleep(0)  # let started tasks reach their wait
        self._release[request_id].set_result(used)
        await asyncio.sleep(0.01)

    def state(self, request_id: str) -> QueueState | None:
        status = self.admission.status(_record(request_id))
        return None if status is None else status.state

    def gauge(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def _record(request_id: str) -> FutureRecord:
    return FutureRecord(request_id=request_id, tenant="a", session_id=None, target_id="s", seq_id=0, trainer_seq=None,
                        op="sample", state=FutureState.PENDING, body=None, body_type=None, meta=None, result=None,
                        result_type=None, error=None, category=None, created_at=0.0, completed_at=None)


async def test_a_busy_pool_queues_then_refuses_and_starts_the_next_when_one_finishes() -> None:
    h = Harness(AdmissionLimits(pool_inflight=1, pool_queue=1))
    h.submit("r1")
    h.submit("r2")
    await asyncio.sleep(0)
    assert h.started == ["r1"] and h.state("r1") is None and h.state("r2") is QueueState.PAUSED_CAPACITY
    with pytest.raises(Backpressure) as refused:
        h.submit("r3")
    assert refused.value.status == 429 and refused.value.headers["retry-after"] == "1"
    assert h.gauge("tinkerkube_gateway_samples_rejected_total", tenant="a", reason="pool_queue_full") == 1
    h.submit("r4", pool="q")  # another pool is not this one's business
    await h.finish("r1")
    assert h.started == ["r1", "r4", "r2"] and h.state("r2") is None
    assert h.waited == {"r1": False, "r4": False, "r2": True}
    assert h.gauge("tinkerkube_gateway_samples_inflight", tenant="a") == 2


async def test_a_tenant_over_its_concurrency_waits_while_another_tenant_passes() -> None:
    h = Harness(AdmissionLimits(pool_inflight=10, tenant_inflight=1, tenant_queue=1))
    h.submit("a1")
    h.submit("a2")
    h.submit("b1", tenant="b")
    await asyncio.sleep(0)
    assert h.started == ["a1", "b1"] and h.state("a2") is QueueState.PAUSED_RATE_LIMIT
    assert h.gauge("tinkerkube_gateway_samples_queued", tenant="a", reason="rate_limit") == 1
    with pytest.raises(Backpressure, match="samples waiting"):
        h.submit("a3")
    await h.finish("a1")
    assert h.started[-1] == "a2" and h.gauge("tinkerkube_gateway_samples_queued", tenant="a", reason="rate_limit") == 0


async def test_tokens_per_minute_reserve_the_most_and_return_the_unused_part() -> None:
    h = Harness(AdmissionLimits(pool_inflight=10, tenant_tokens_per_minute=60))
    h.submit("r1", cost=50)
    h.submit("r2", cost=50)
    h.submit("r3", cost=50)
    await asyncio.sleep(0)
    assert h.started == ["r1", "r2"]  # 60 → 10 → -40: a positive balance may overdraw once
    assert h.state("r3") is QueueState.PAUSED_RATE_LIMIT
    await h.finish("r1", used=5)  # 45 back: the balance is 5, so r3 starts
    assert h.started == ["r1", "r2", "r3"]
    assert h.gauge("tinkerkube_gateway_sampled_tokens_total", tenant="a") == 5
    h.submit("r4", cost=1)
    await asyncio.sleep(0)
    assert "r4" not in h.started  # 5 - 50 = -45: waits for the refill (1 token a second)
    h.clock.now += 46
    await h.finish("r2", used=50)  # returns nothing; the clock refilled 46
    assert h.started[-1] == "r4"


async def test_the_pump_wakes_itself_when_tokens_come_back() -> None:
    h = Harness(AdmissionLimits(pool_inflight=10, tenant_tokens_per_minute=600))  # 10 a second
    h.submit("r1", cost=601)  # overdraws to -1: ~0.2 s to positive
    h.submit("r2", cost=1)
    await asyncio.sleep(0)
    assert h.started == ["r1"]
    h.clock.now += 1.0  # the timer the pump armed fires into a refilled bucket
    await asyncio.sleep(0.3)
    assert h.started == ["r1", "r2"]


async def test_a_withdrawn_ticket_never_starts() -> None:
    h = Harness(AdmissionLimits(pool_inflight=1, pool_queue=5))
    h.submit("r1")
    h.submit("r2")
    assert h.admission.withdraw("r2") and not h.admission.withdraw("r2") and not h.admission.withdraw("r1")
    await h.finish("r1")
    assert h.started == ["r1"] and h.state("r2") is None


async def test_nothing_starts_after_close() -> None:
    h = Harness(AdmissionLimits(pool_inflight=1))
    h.submit("r1")
    h.submit("r2")
    h.admission.close()
    await h.finish("r1")
    assert h.started == ["r1"]


async def test_try_again_takes_its_queue_state_from_the_first_source_that_knows(tmp_path: Path) -> None:
    from tinkerkube_gateway.services.futures import ACTIVE, FuturesService, QueueStatus
    from tinkerkube_gateway.store.repo import AsyncRepo, Repo

    futures = FuturesService(AsyncRepo(Repo(f"sqlite:///{tmp_path / 'gw.db'}")), Metrics())
    assert futures.queue_status(_record("r")) == ACTIVE
    capacity = QueueStatus(QueueState.PAUSED_CAPACITY, "waiting for a node")
    futures.queue_sources += [lambda f: None, lambda f: capacity if f.request_id == "r" else None,
                              lambda f: QueueStatus(QueueState.PAUSED_RATE_LIMIT)]
    assert futures.queue_status(_record("r")) == capacity
    assert futures.queue_status(_record("other")).state is QueueState.PAUSED_RATE_LIMIT
