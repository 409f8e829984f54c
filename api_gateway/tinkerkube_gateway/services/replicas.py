"""This gateway replica's place among the replicas that share one database.

SQLite (one gateway process): the replica takes every run's lease by force and there is nothing to
listen to. PostgreSQL (several replicas behind one Service):
- exactly one replica dispatches a run: the holder of its lease (store/coordination.py), renewed every
  third of `lease_seconds`; a heartbeat that finds a lease taken over drops that run's worker, and
  takes over live runs whose lease expired (a replica died) or was released (a replica stopped);
- one LISTEN connection per replica (psycopg 3, async) feeds the shared in-process notifier: "future
  completed" wakes this replica's long-poll waiters, "ops submitted for run X" wakes X's worker here,
  which reads the new ops from the store. Waiters never poll the database.

Payloads: `c:<replica>:<request_id>` and `s:<replica>:<model_id>`; a replica ignores its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy.engine import make_url

from tinkerkube_gateway.store.coordination import CHANNEL, SAMPLE_LEASE
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)
Hook = Callable[[str], Awaitable[None]]


def _noop_sync(_: str) -> None:
    return None


async def _noop(_: str) -> None:
    return None


class Replicas:
    def __init__(self, repo: AsyncRepo, *, multi: bool = False, lease_seconds: float = 15.0,
                 database_url: str | None = None, replica_id: str | None = None):
        self.repo = repo
        self.multi = multi
        self.lease_seconds = lease_seconds
        self.database_url = database_url
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.epochs: dict[str, int] = {}  # the runs this replica dispatches
        self.on_completed: Callable[[str], None] = _noop_sync  # the notifier
        self.on_submitted: Callable[[str], None] = _noop_sync  # wake the run's worker here
        self.on_lost: Hook = _noop  # another replica took the run over
        self.on_orphan: Hook = _noop  # a live run nobody dispatches
        self.on_orphan_sample: Hook = _noop  # a pending sample whose replica died: run it here
        self.on_resync: Callable[[], None] = lambda: None  # notifications may have been missed
        self._tasks: list[asyncio.Task[None]] = []

    # --- leases ---------------------------------------------------------------------------------------
    async def claim(self, model_id: str) -> int | None:
        """The epoch to dispatch `model_id` under, or None while another replica dispatches it."""
        epoch = await self.repo.claim_lease(model_id, self.replica_id, time.time(), self.lease_seconds,
                                            force=not self.multi)
        if epoch is not None:
            self.epochs[model_id] = epoch
        return epoch

    async def release(self, model_id: str) -> None:
        epoch = self.epochs.pop(model_id, None)
        if epoch is not None:
            await self.repo.release_lease(model_id, self.replica_id, epoch)

    async def track_sample(self, request_id: str) -> None:
        """A sample runs on this replica: if the replica dies, another one re-runs it (no state changes)."""
        if self.multi:
            await self.repo.claim_lease(SAMPLE_LEASE + request_id, self.replica_id, time.time(), self.lease_seconds)

    async def untrack_sample(self, request_id: str) -> None:
        if self.multi:
            await self.repo.release_lease(SAMPLE_LEASE + request_id, self.replica_id)

    async def heartbeat(self) -> None:
        """Renew what this replica holds, let go of what it lost, take over orphaned runs."""
        held = await self.repo.renew_leases(self.replica_id, time.time(), self.lease_seconds)
        for model_id, epoch in list(self.epochs.items()):
            if held.get(model_id) != epoch:
                log.warning("run %s was taken over by another gateway replica; stopping its dispatch here",
                            model_id)
                self.epochs.pop(model_id, None)
                await self.on_lost(model_id)
        for model_id in await self.repo.orphaned_runs(time.time()):
            await self.on_orphan(model_id)
        for key in await self.repo.orphaned_samples(time.time()):
            if await self.repo.claim_lease(key, self.replica_id, time.time(), self.lease_seconds) is not None:
                await self.on_orphan_sample(key.removeprefix(SAMPLE_LEASE))

    # --- notifications --------------------------------------------------------------------------------
    def completed_payload(self, request_id: str) -> str | None:
        return f"c:{self.replica_id}:{request_id}" if self.multi else None

    async def submitted(self, model_id: str) -> None:
        if self.multi:
            await self.repo.notify(f"s:{self.replica_id}:{model_id}")

    def deliver(self, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        origin, _, key = rest.partition(":")
        if origin == self.replica_id or not key:
            return
        if kind == "c":
            self.on_completed(key)
        elif kind == "s":
            self.on_submitted(key)

    # --- background tasks -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.multi:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="lease-heartbeat"))
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="notify-listener"))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.heartbeat()
            except Exception:
                log.exception("lease heartbeat failed")

    async def _listen_loop(self) -> None:
        import psycopg

        assert self.database_url is not None
        dsn = make_url(self.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.on_resync()  # anything sent while not listening is re-read from the store
                    async for note in conn.notifies():
                        self.deliver(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("notification listener lost its connection; reconnecting", exc_info=True)
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for model_id in list(self.epochs):  # a clean stop hands the runs over at once
            with contextlib.suppress(Exception):
                await self.release(model_id)
