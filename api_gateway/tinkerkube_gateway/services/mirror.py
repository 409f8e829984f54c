"""Futures aggregates per training run, handed to the backend (the CR's `status.futures`).

Counts since this gateway started, plus a short window of the most recent futures: etcd objects are
small and status writes are dear, so the backend coalesces (about one write per second per run).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from tinkerkube_contract.resource import RECENT_FUTURES_WINDOW, FuturesStatus, RecentFuture
from tinkerkube_gateway.backends.base import SessionBackend
from tinkerkube_gateway.store.records import FutureRecord, FutureState

log = logging.getLogger(__name__)


class FuturesMirror:
    def __init__(self, backend: SessionBackend):
        self.backend = backend
        self._status: dict[str, FuturesStatus] = {}

    async def changed(self, fut: FutureRecord, state: FutureState) -> None:
        if ":train:" not in fut.target_id:
            return  # samples are mirrored by nobody: their sampler may be shared
        old = self._status.get(fut.target_id) or FuturesStatus()
        now = datetime.now(UTC).isoformat()
        recent = [r for r in old.recent if r.request_id != fut.request_id]
        recent.append(RecentFuture(request_id=fut.request_id, op=fut.op, seq_id=fut.seq_id, state=state.value,
                                   updated_at=now))
        done = state is not FutureState.PENDING
        new = old.model_copy(update={
            "submitted": old.submitted + (0 if done else 1),
            "completed": old.completed + (state is FutureState.COMPLETE),
            "failed": old.failed + (state is FutureState.FAILED),
            "pending": max(0, old.pending + (-1 if done else 1)),
            "last_seq_id": max(old.last_seq_id or 0, fut.seq_id or 0),
            "last_completed_seq_id": max(old.last_completed_seq_id or 0, fut.seq_id or 0) if done
            else old.last_completed_seq_id,
            "updated_at": now, "recent": recent[-RECENT_FUTURES_WINDOW:]})
        self._status[fut.target_id] = new
        try:
            await self.backend.mirror_futures(fut.target_id, new)
        except Exception:
            log.warning("could not mirror futures of %s", fut.target_id, exc_info=True)

    def forget(self, model_id: str) -> None:
        self._status.pop(model_id, None)
