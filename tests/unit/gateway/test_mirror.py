"""Futures aggregates handed to the backend: derived from the store (counts, last seq ids, a bounded
recent window), so they are right after a gateway restart and whichever replica writes them."""

from __future__ import annotations

from typing import Any

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_contract.resource import RECENT_FUTURES_WINDOW, FuturesStatus
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.store.repo import AsyncRepo, Repo

RUN = "s:train:0"


class _Backend:
    def __init__(self) -> None:
        self.writes: list[tuple[str, FuturesStatus]] = []

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        self.writes.append((model_id, futures))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def _service(repo: Repo, backend: _Backend) -> FuturesService:
    service = FuturesService(AsyncRepo(repo), Metrics())
    service.mirror = FuturesMirror(backend, service.repo, interval=0.01)  # type: ignore[arg-type]
    return service


async def _submit(service: FuturesService, seq: int, target: str = RUN):  # type: ignore[no-untyped-def]
    fut, _ = await service.create(tenant="t", session_id="s", target_id=target, seq_id=seq, op="optim_step",
                                  body=b"{}", body_type="application/json")
    return fut


async def test_aggregates_follow_submits_and_completions(repo: Repo) -> None:
    backend = _Backend()
    service = _service(repo, backend)
    futs = [await _submit(service, seq) for seq in range(1, 21)]
    for fut in futs[:9]:
        await service.complete(fut, b"{}", "application/json")
    await service.fail(futs[9], "boom", ErrorCategory.USER)
    assert service.mirror is not None
    await service.mirror.drain()
    model_id, status = backend.writes[-1]
    assert model_id == RUN
    assert (status.submitted, status.completed, status.failed, status.pending) == (20, 9, 1, 10)
    assert status.last_seq_id == 20 and status.last_completed_seq_id == 10
    assert len(status.recent) == RECENT_FUTURES_WINDOW
    assert len(backend.writes) < 31  # coalesced: fewer derivations than changes


async def test_aggregates_are_right_after_a_gateway_restart(repo: Repo) -> None:
    first = _service(repo, _Backend())
    futs = [await _submit(first, seq) for seq in range(1, 6)]
    for fut in futs[:3]:
        await first.complete(fut, b"{}", "application/json")
    assert first.mirror is not None
    await first.mirror.drain()
    backend = _Backend()  # a new gateway process (or another replica) on the same store
    second = _service(repo, backend)
    await second.complete(futs[3], b"{}", "application/json")
    assert second.mirror is not None
    await second.mirror.drain()
    status = backend.writes[-1][1]
    assert (status.submitted, status.completed, status.failed, status.pending) == (5, 4, 0, 1)
    assert status.last_seq_id == 5 and status.last_completed_seq_id == 4
    assert [r.seq_id for r in status.recent][-1] == 4  # the most recent change last


async def test_samples_are_not_mirrored(repo: Repo) -> None:
    backend = _Backend()
    service = _service(repo, backend)
    await _submit(service, 0, target="s:sample:0")
    assert service.mirror is not None
    await service.mirror.drain()
    assert backend.writes == []


async def test_heartbeat_keepalive_refreshes_each_run_once_per_interval(repo: Repo) -> None:
    """The operator reaps runs whose status.futures.updatedAt goes stale; a heartbeating session must
    keep its idle runs fresh without a status write per heartbeat."""
    backend = _Backend()
    service = _service(repo, backend)
    now = [1000.0]
    assert service.mirror is not None
    service.mirror = FuturesMirror(backend, service.repo, interval=0.01,  # type: ignore[arg-type]
                                   keepalive_interval=60.0, clock=lambda: now[0])
    mirror = service.mirror
    other = "s:train:1"
    mirror.keepalive([RUN, other])
    await mirror.drain()
    assert sorted(m for m, _ in backend.writes) == [RUN, other]
    for _ in range(5):  # heartbeats every 10 s: nothing new within the interval
        now[0] += 10.0
        mirror.keepalive([RUN, other])
        await mirror.drain()
    assert len(backend.writes) == 2
    now[0] += 15.0  # 65 s after the first write
    mirror.keepalive([RUN])
    await mirror.drain()
    assert [m for m, _ in backend.writes[2:]] == [RUN]
    assert backend.writes[-1][1].updated_at is not None


async def test_a_real_change_restarts_the_keepalive_clock(repo: Repo) -> None:
    backend = _Backend()
    service = _service(repo, backend)
    now = [0.0]
    service.mirror = FuturesMirror(backend, service.repo, interval=0.01,  # type: ignore[arg-type]
                                   keepalive_interval=60.0, clock=lambda: now[0])
    await _submit(service, 1)
    await service.mirror.drain()
    writes = len(backend.writes)
    now[0] += 30.0
    service.mirror.keepalive([RUN])  # written 30 s ago by the submit: no keepalive write yet
    await service.mirror.drain()
    assert len(backend.writes) == writes
