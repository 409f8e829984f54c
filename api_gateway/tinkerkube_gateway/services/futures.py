"""Futures: creation (idempotent per (target_id, seq_id)), completion, and long-poll retrieval.

One shared `Notifier` wakes every waiter of a request id when it completes: waiters never poll the
database. A waiter registers first, then reads the store once, then sleeps on its asyncio future, so a
completion between the read and the sleep is never missed. A completion finished by this replica hands
its final record to the waiters (no re-read); one from another replica (LISTEN/NOTIFY) or a resync
carries none, and the waiter reads the store. A finished record nobody waited for is kept briefly
(`_RECENT` entries, dropped on first retrieval) so the usual submit-then-retrieve skips that read too:
a finished future never changes again, so either copy is the store's. Likewise a future created here
and not finished as far as this replica knows (`_pending_here`) is waited on without reading the store
first; a completion on another replica (NOTIFY, `completed_elsewhere`) or a resync forgets that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_contract.resource import SessionMode
from tinkerkube_gateway.errors import SeqIdReused, UnknownFuture
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.services.usage import usage_of
from tinkerkube_gateway.store.protocol import EventTarget, clone_of
from tinkerkube_gateway.store.records import FutureOp, FutureRecord, FutureState, ModelRecord
from tinkerkube_gateway.store.repo import AsyncRepo

_RECENT = 512  # finished records kept for their first retrieval
_PENDING_HERE_MAX = 100_000  # beyond this, waiters simply read the store
EVENTS = "events:"  # notifier key prefix of a sampling session's completion log (request ids start "req-")


class QueueState(StrEnum):
    """The SDK's `queue_state` of a try_again answer (it logs the paused ones as warnings)."""

    ACTIVE = "active"
    PAUSED_CAPACITY = "paused_capacity"  # waiting for compute: a saturated sampler, a run awaiting capacity
    PAUSED_RATE_LIMIT = "paused_rate_limit"  # waiting for the tenant's own limits


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatus:
    state: QueueState = QueueState.ACTIVE
    reason: str | None = None  # shown to the user (queue_state_reason)


ACTIVE = QueueStatus()
# What a pending future waits for, from whoever holds it back (sample admission, a run waiting for cluster
# capacity...); None: not this source's. The first source with an answer wins.
QueueStateSource = Callable[[FutureRecord], QueueStatus | None]


class Notifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[FutureRecord | None]]] = {}

    def register(self, request_id: str) -> asyncio.Future[FutureRecord | None]:
        fut: asyncio.Future[FutureRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, set()).add(fut)
        return fut

    def unregister(self, request_id: str, fut: asyncio.Future[FutureRecord | None]) -> None:
        waiters = self._waiters.get(request_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[request_id]

    def notify(self, request_id: str, record: FutureRecord | None = None) -> bool:
        """Wakes the waiters of `request_id`, handing them `record` (its final state) when known, else None
        (they re-read the store). True when some waiter took it."""
        woken = False
        for fut in self._waiters.pop(request_id, ()):
            if not fut.done():
                fut.set_result(record)
                woken = True
        return woken

    def notify_all(self, prefix: str = "") -> None:
        """Every waiter (of keys starting with `prefix`) re-reads the store (after notifications may have
        been missed)."""
        for request_id in [key for key in self._waiters if key.startswith(prefix)]:
            self.notify(request_id)

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def _new_record(tenant: str, session_id: str | None, target_id: str, seq_id: int | None, op: FutureOp | str,
                body: bytes | None, body_type: str | None, meta: dict[str, object] | None) -> FutureRecord:
    return FutureRecord(
        request_id=new_request_id(), tenant=tenant, session_id=session_id, target_id=target_id, seq_id=seq_id,
        trainer_seq=None, op=FutureOp(op), state=FutureState.PENDING, body=body, body_type=body_type, meta=meta,
        result=None, result_type=None, error=None, category=None, created_at=time.time(), completed_at=None)


class FuturesService:
    def __init__(self, repo: AsyncRepo, metrics: Metrics, *, long_poll_seconds: float = 30.0):
        self.repo = repo
        self.notifier = Notifier()
        self.metrics = metrics
        self.long_poll_seconds = long_poll_seconds
        self.mirror: FuturesMirror | None = None
        self.broadcast: Callable[[str], str | None] = lambda _request_id: None  # NOTIFY payload (replicas)
        self._recent: dict[str, FutureRecord] = {}  # finished here, not yet retrieved (oldest first)
        self._pending_here: dict[str, str] = {}  # request_id -> tenant: created here, not known finished
        self.queue_sources: list[QueueStateSource] = []

    def queue_status(self, record: FutureRecord) -> QueueStatus:
        """What a pending future is waiting for: the try_again answer's queue_state (and reason)."""
        for source in self.queue_sources:
            status = source(record)
            if status is not None:
                return status
        return ACTIVE

    async def create(self, *, tenant: str, session_id: str | None, target_id: str, seq_id: int | None,
                     op: FutureOp | str,
                     body: bytes | None = None, body_type: str | None = None,
                     meta: dict[str, object] | None = None) -> tuple[FutureRecord, bool]:
        """Returns the new future, or the original one for a retried submit of the same key."""
        record = _new_record(tenant, session_id, target_id, seq_id, op, body, body_type, meta)
        stored, created = await self.repo.insert_future(record)
        await self._created(record, stored, created)
        return stored, created

    async def create_op(self, *, tenant: str, model_id: str, seq_id: int, op: FutureOp, body: bytes, body_type: str,
                        meta: dict[str, object] | None,
                        kind: SessionMode = SessionMode.TRAIN) -> tuple[ModelRecord | None, FutureRecord | None, bool]:
        """`create` for a training op, under the run's session, in one store call (`insert_op_future`,
        which also touches the run): (None, None, False) when the run is not the tenant's."""
        record = _new_record(tenant, None, model_id, seq_id, op, body, body_type, meta)
        model, stored, created = await self.repo.insert_op_future(record, kind=kind, now=record.created_at)
        if stored is not None:
            await self._created(record, stored, created)
        return model, stored, created

    async def refuse(self, *, tenant: str, session_id: str | None, target_id: str, seq_id: int, op: FutureOp,
                     problem: str) -> FutureRecord | None:
        """Uses up `seq_id` of `target_id` with a future that failed at once (nothing ran): a request the
        gateway refused, or a gap sealed. The run's worker skips it like any finished op. None when the
        seq_id already has a future (the refused request was a retry, or the gap filled after all)."""
        record = dataclasses.replace(
            _new_record(tenant, session_id, target_id, seq_id, op, None, None, {"rejected": problem}),
            state=FutureState.FAILED, error=problem, category=ErrorCategory.USER.value, completed_at=time.time())
        stored, created = await self.repo.insert_future(record)
        if not created:
            return None
        self.metrics.futures_total.labels(op=record.op, outcome=FutureState.FAILED.value).inc()
        if self.mirror is not None:
            await self.mirror.changed(stored, FutureState.FAILED)
        return stored

    async def _created(self, record: FutureRecord, stored: FutureRecord, created: bool) -> None:
        if not created and stored.rejected is not None:
            raise SeqIdReused(f"seq_id {record.seq_id} of {record.target_id} was already used by a request the "
                              f"gateway refused: {stored.rejected}")
        if not created and (stored.op != record.op or stored.tenant != record.tenant or stored.body != record.body):
            raise SeqIdReused(f"seq_id {record.seq_id} of {record.target_id} was already used by a different "
                              f"request ({stored.op}); every request needs the next seq_id")
        if created:
            if len(self._pending_here) < _PENDING_HERE_MAX:
                self._pending_here[stored.request_id] = stored.tenant
            self.metrics.queue_depth.inc()
            if self.mirror is not None:
                await self.mirror.changed(stored, FutureState.PENDING)

    async def complete(self, record: FutureRecord, result: bytes, result_type: str) -> bool:
        return await self._finish(record, FutureState.COMPLETE, result=result, result_type=result_type)

    async def fail(self, record: FutureRecord, error: str, category: ErrorCategory) -> bool:
        """False when the future had finished already (that outcome stands)."""
        return await self._finish(record, FutureState.FAILED, error=error, category=category.value)

    async def _finish(self, record: FutureRecord, state: FutureState, **values: Any) -> bool:
        here = self._pending_here.pop(record.request_id, None) is not None  # from now, new waiters read the store
        now = time.time()
        final = dataclasses.replace(record, state=state, completed_at=now, body=None, **{
            "result": None, "result_type": None, "error": None, "category": None, **values})
        early = here and record.op != FutureOp.SAMPLE
        # Created here and pending as far as this replica knows: this completion is the one, so its
        # waiters get it now instead of after the store's write (one write less on every op's critical
        # path). Should the gateway die before the write, the op is replayed on restart and completes alike.
        # The yield lets the woken waiters answer first: on SQLite the write runs on this loop and would
        # otherwise hold their responses until it commits (on PostgreSQL it yields to a thread anyway).
        if early and self._deliver(final):
            await asyncio.sleep(0)
        event = None
        if record.op == FutureOp.SAMPLE:  # logged for retrieve_futures, in the same commit
            result = values.get("result")
            event = EventTarget(record.target_id, clone_of(record.seq_id), None if result is None else len(result))
        usage = (usage_of(record, values.get("result"), values.get("result_type"))
                 if state == FutureState.COMPLETE else None)
        changed = await self.repo.finish_future(record.request_id, state=state, now=now,
                                                notify=self.broadcast(record.request_id), event=event, usage=usage,
                                                **values)
        if not changed:  # finished before (a replay, a race, another replica): waiters read what won
            self.notifier.notify(record.request_id)
            return False
        self.metrics.queue_depth.dec()
        self.metrics.future_seconds.labels(op=record.op).observe(max(0.0, now - record.created_at))
        self.metrics.futures_total.labels(op=record.op, outcome=state.value).inc()
        if self.mirror is not None:
            await self.mirror.changed(record, state)
        if event is not None:
            self.notifier.notify(EVENTS + record.target_id)
        if not early:
            self._deliver(final)
        else:  # waiters that came while it was written read a pending row: hand it to them too
            self.notifier.notify(record.request_id, final)
        return True

    def _deliver(self, final: FutureRecord) -> bool:
        """Hand a finished record to its waiters (True when one took it), or keep it for its first retrieval."""
        if self.notifier.notify(final.request_id, final):
            return True
        self._recent[final.request_id] = final
        if len(self._recent) > _RECENT:
            del self._recent[next(iter(self._recent))]
        return False

    def completed_elsewhere(self, request_id: str) -> None:
        """Another replica finished `request_id` (its NOTIFY): waiters here re-read the store."""
        self._pending_here.pop(request_id, None)
        self.notifier.notify(request_id)
        self.notifier.notify_all(EVENTS)  # (which sampling session it was is not in the payload)

    def resync(self) -> None:
        """Notifications may have been missed: forget what is believed pending, every waiter re-reads."""
        self._pending_here.clear()
        self.notifier.notify_all()

    async def get_owned(self, tenant: str, request_id: str) -> FutureRecord:
        record = await self.repo.get_future(request_id)
        if record is None or record.tenant != tenant:
            raise UnknownFuture(f"unknown request_id {request_id!r}")
        return record

    async def pause(self, request_id: str, seconds: float) -> None:
        """Sleeps `seconds`, or less: until `request_id`, created here, finishes (reads no store).
        Why: a stream pausing between progress reads must not keep its client waiting once the sample is
        done. A finished record this wakes for is kept for the next retrieval, as if nobody had waited."""
        if request_id in self._recent:  # finished here already
            return
        if request_id not in self._pending_here:  # not tracked here: a plain pause
            await asyncio.sleep(seconds)
            return
        waiter = self.notifier.register(request_id)
        final = None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    final = await waiter
        finally:
            self.notifier.unregister(request_id, waiter)
        if final is not None:
            self._deliver(final)

    async def wait(self, tenant: str, request_id: str, timeout: float | None = None) -> FutureRecord:
        """The future once finished, or still pending after `timeout` (the caller answers try_again).
        The record handed over by a completion here carries no `body` (the op's input)."""
        waiter = self.notifier.register(request_id)
        try:
            if self._pending_here.get(request_id) != tenant:
                record = self._recent.pop(request_id, None)
                if record is None or record.tenant != tenant:
                    record = await self.get_owned(tenant, request_id)
                if record.state != FutureState.PENDING:
                    return record
            final = None
            with contextlib.suppress(TimeoutError):
                # in this task: asyncio.wait_for adds two loop hops between a completion and this response
                async with asyncio.timeout(timeout if timeout is not None else self.long_poll_seconds):
                    final = await waiter
            if final is not None and final.tenant == tenant:
                return final
            return await self.get_owned(tenant, request_id)
        finally:
            self.notifier.unregister(request_id, waiter)
