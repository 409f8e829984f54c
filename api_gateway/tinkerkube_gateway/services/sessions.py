"""Tinker sessions: create, heartbeat, finish, and reaping of sessions whose heartbeats stopped.

Trainer processes outlive no session (DESIGN.md): finishing or reaping a session stops every trainer
it started and fails its pending futures with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from tinkerkube_contract.resource import SessionMode
from tinkerkube_gateway.errors import SessionGone, UnknownSession
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.schemas import CreateSessionRequest
from tinkerkube_gateway.store.records import SessionRecord, SessionStatus
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)

StopSessionRuns = Callable[[str, str], Awaitable[None]]  # (session_id, reason)
FINISH_REASONS = ("success", "errored", "interrupted")  # the SDK's ClientSessionFinishReason types


class SessionsService:
    def __init__(self, repo: AsyncRepo, metrics: Metrics, *, idle_timeout: float, reap_interval: float):
        self.repo = repo
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.reap_interval = reap_interval
        self.stop_runs: StopSessionRuns | None = None
        self.on_heartbeat: Callable[[str], Awaitable[None]] | None = None  # (session_id): keep its runs alive
        self.periodic: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def create(self, tenant: str, req: CreateSessionRequest) -> str:
        session_id = "sess-" + uuid.uuid4().hex[:16]
        now = time.time()
        await self.repo.insert_session(
            session_id=session_id, tenant=tenant, status=SessionStatus.ACTIVE, created_at=now, last_heartbeat=now,
            user_metadata=req.user_metadata, tags=req.tags, display_name=req.display_name, ended_reason=None)
        if req.project_id is not None:
            await self.repo.set_session_extras(session_id, project_id=req.project_id)
        self.metrics.active_sessions.inc()
        return session_id

    async def assign_project(self, tenant: str, session_id: str, project_id: str) -> None:
        """Moves the session (and so its runs and samplers) into `project_id`; there is no way back out."""
        await self.get_owned(tenant, session_id)
        await self.repo.set_session_extras(session_id, project_id=project_id)

    async def get_owned(self, tenant: str, session_id: str) -> SessionRecord:
        record = await self.repo.get_session(session_id)
        if record is None or record.tenant != tenant:
            raise UnknownSession(f"unknown session {session_id!r}")
        return record

    async def get_active(self, tenant: str, session_id: str) -> SessionRecord:
        record = await self.get_owned(tenant, session_id)
        if record.status != SessionStatus.ACTIVE:
            raise SessionGone(f"session {session_id} is {record.status} ({record.ended_reason}); create a new one")
        return record

    async def heartbeat(self, tenant: str, session_id: str) -> None:
        await self.get_active(tenant, session_id)
        await self.repo.heartbeat(session_id, time.time())
        if self.on_heartbeat is not None:
            await self.on_heartbeat(session_id)

    async def finish(self, tenant: str, session_id: str, detail: str) -> None:
        await self.get_owned(tenant, session_id)
        if detail in FINISH_REASONS:  # what session search reports as the client's finish reason
            await self.repo.set_session_extras(session_id, finish_reason=detail)
        await self._end(session_id, SessionStatus.FINISHED, f"finished by the client ({detail})")

    async def _end(self, session_id: str, status: SessionStatus, reason: str) -> None:
        if await self.repo.end_session(session_id, status, reason):
            self.metrics.active_sessions.dec()
            if self.stop_runs is not None:
                await self.stop_runs(session_id, f"session {session_id} was {status}: {reason}")

    async def reap_idle(self) -> list[str]:
        cutoff = time.time() - self.idle_timeout
        reaped = []
        for record in await self.repo.idle_sessions(cutoff):
            log.warning("reaping session %s: no heartbeat for %.0fs", record.session_id, self.idle_timeout)
            await self._end(record.session_id, SessionStatus.REAPED,
                            f"no heartbeat for {self.idle_timeout:.0f}s (idle timeout)")
            reaped.append(record.session_id)
        return reaped

    async def list_ids(self, tenant: str, limit: int, offset: int) -> list[str]:
        return [s.session_id for s in await self.repo.list_sessions(tenant, limit, offset)]

    async def describe(self, tenant: str, session_id: str) -> dict[str, Any]:
        session = await self.get_owned(tenant, session_id)
        runs = await self.repo.list_models(session_id=session_id, kind=SessionMode.TRAIN)
        samplers = await self.repo.list_samplers(session_id)
        metadata = None if session.user_metadata is None else {k: str(v) for k, v in session.user_metadata.items()}
        return {"training_run_ids": [r.model_id for r in runs], "sampler_ids": [s.sampler_id for s in samplers],
                "user_metadata": metadata, "display_name": session.display_name}

    async def refresh_gauge(self) -> None:
        self.metrics.active_sessions.set(await self.repo.count_active_sessions())

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="session-reaper")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap_idle()
                for job in self.periodic:
                    await job()
            except Exception:
                log.exception("reaper pass failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
