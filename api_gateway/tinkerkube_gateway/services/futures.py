"""Futures: creation (idempotent per (target_id, seq_id)), completion, and long-poll retrieval.

One shared `Notifier` wakes every waiter of a request id when it completes: waiters never poll the
database. A waiter registers first, then reads the store once, then sleeps on its asyncio future, so a
completion between the read and the sleep is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_gateway.errors import SeqIdReused, UnknownFuture
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo


class Notifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def register(self, request_id: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, set()).add(fut)
        return fut

    def unregister(self, request_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(request_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[request_id]

    def notify(self, request_id: str) -> None:
        for fut in self._waiters.pop(request_id, set()):
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        """Every waiter re-reads the store (after notifications may have been missed)."""
        for request_id in list(self._waiters):
            self.notify(request_id)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


class FuturesService:
    def __init__(self, repo: AsyncRepo, metrics: Metrics, *, long_poll_seconds: float = 30.0):
        self.repo = repo
        self.notifier = Notifier()
        self.metrics = metrics
        self.long_poll_seconds = long_poll_seconds
        self.mirror: FuturesMirror | None = None
        self.broadcast: Callable[[str], str | None] = lambda _request_id: None  # NOTIFY payload (replicas)

    async def create(self, *, tenant: str, session_id: str | None, target_id: str, seq_id: int | None, op: str,
                     body: bytes | None = None, body_type: str | None = None,
                     meta: dict[str, object] | None = None) -> tuple[FutureRecord, bool]:
        """Returns the new future, or the original one for a retried submit of the same key."""
        record = FutureRecord(
            request_id=new_request_id(), tenant=tenant, session_id=session_id, target_id=target_id, seq_id=seq_id,
            trainer_seq=None, op=op, state=FutureState.PENDING, body=body, body_type=body_type, meta=meta, result=None,
            result_type=None, error=None, category=None, created_at=time.time(), completed_at=None)
        stored, created = await self.repo.insert_future(record)
        if not created and (stored.op != op or stored.tenant != tenant or stored.body != body):
            raise SeqIdReused(f"seq_id {seq_id} of {target_id} was already used by a different request "
                              f"({stored.op}); every request needs the next seq_id")
        if created:
            self.metrics.queue_depth.inc()
            if self.mirror is not None:
                await self.mirror.changed(stored, FutureState.PENDING)
        return stored, created

    async def complete(self, record: FutureRecord, result: bytes, result_type: str) -> None:
        await self._finish(record, FutureState.COMPLETE, result=result, result_type=result_type)

    async def fail(self, record: FutureRecord, error: str, category: ErrorCategory) -> None:
        await self._finish(record, FutureState.FAILED, error=error, category=category.value)

    async def _finish(self, record: FutureRecord, state: FutureState, **values: object) -> None:
        now = time.time()
        changed = await self.repo.finish_future(record.request_id, state=state, now=now,
                                                notify=self.broadcast(record.request_id), **values)
        if changed:
            self.metrics.queue_depth.dec()
            self.metrics.future_seconds.labels(op=record.op).observe(max(0.0, now - record.created_at))
            self.metrics.futures_total.labels(op=record.op, outcome=state.value).inc()
            if self.mirror is not None:
                await self.mirror.changed(record, state)
        self.notifier.notify(record.request_id)

    async def get_owned(self, tenant: str, request_id: str) -> FutureRecord:
        record = await self.repo.get_future(request_id)
        if record is None or record.tenant != tenant:
            raise UnknownFuture(f"unknown request_id {request_id!r}")
        return record

    async def wait(self, tenant: str, request_id: str, timeout: float | None = None) -> FutureRecord:
        """The future once finished, or still pending after `timeout` (the caller answers try_again)."""
        waiter = self.notifier.register(request_id)
        try:
            record = await self.get_owned(tenant, request_id)
            if record.state != FutureState.PENDING:
                return record
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout if timeout is not None else self.long_poll_seconds)
            return await self.get_owned(tenant, request_id)
        finally:
            self.notifier.unregister(request_id, waiter)
