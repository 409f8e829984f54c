"""Futures aggregates handed to the backend: counts, last seq ids, a bounded recent window."""

from __future__ import annotations

import time
from typing import Any

from tinkerkube_contract.resource import RECENT_FUTURES_WINDOW, FuturesStatus
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.store.records import FutureRecord, FutureState


class _Backend:
    def __init__(self) -> None:
        self.writes: list[tuple[str, FuturesStatus]] = []

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        self.writes.append((model_id, futures))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def _fut(seq: int, target: str = "s:train:0") -> FutureRecord:
    return FutureRecord(request_id=f"r{seq}", tenant="t", session_id="s", target_id=target, seq_id=seq,
                        trainer_seq=None, op="optim_step", state="pending", body=None, body_type=None, meta=None,
                        result=None, result_type=None, error=None, category=None, created_at=time.time(),
                        completed_at=None)


async def test_aggregates_follow_submits_and_completions() -> None:
    backend = _Backend()
    mirror = FuturesMirror(backend)  # type: ignore[arg-type]
    for seq in range(1, 21):
        await mirror.changed(_fut(seq), FutureState.PENDING)
    for seq in range(1, 11):
        await mirror.changed(_fut(seq), FutureState.COMPLETE if seq < 10 else FutureState.FAILED)
    model_id, status = backend.writes[-1]
    assert model_id == "s:train:0"
    assert (status.submitted, status.completed, status.failed, status.pending) == (20, 9, 1, 10)
    assert status.last_seq_id == 20 and status.last_completed_seq_id == 10
    assert len(status.recent) == RECENT_FUTURES_WINDOW


async def test_samples_are_not_mirrored() -> None:
    backend = _Backend()
    await FuturesMirror(backend).changed(_fut(0, target="s:sample:0"), FutureState.PENDING)  # type: ignore[arg-type]
    assert backend.writes == []
