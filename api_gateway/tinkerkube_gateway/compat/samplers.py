"""`model` → a Tinker sampler of the tenant, created and kept through `SamplingService`.

Why a gateway-held session: a Tinker sampler belongs to a session, and sessions live by heartbeats. An
OpenAI client sends none, so this replica keeps one session per tenant ("openai-compat"), heartbeats it
while requests come (at most every quarter of the idle timeout), and lets the reaper end it once they
stop: the sampler processes it holds then stop like any idle session's. The sampler itself is the one
`create_sampling_session` gives (a shared per-tenant process for base models and stored checkpoints; a
live run's own trainer for its sampler weights), so the same weights answer both APIs.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

from tinkerkube_contract import paths
from tinkerkube_contract.models import base_model_name
from tinkerkube_gateway.errors import SessionGone, UnknownModel, UnknownSession
from tinkerkube_gateway.schemas import CreateSamplingSessionRequest, CreateSessionRequest
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.store.records import SamplerRecord

SESSION_TAG = "openai-compat"


@dataclass
class _TenantSession:
    session_id: str
    last_heartbeat: float
    samplers: dict[str, SamplerRecord]  # model → its sampler in this session


class CompatSamplers:
    def __init__(self, sessions: SessionsService, sampling: SamplingService, base_models: list[str]):
        self.sessions = sessions
        self.sampling = sampling
        self.base_models = base_models
        self._tenants: dict[str, _TenantSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._seq = itertools.count()

    def check_model(self, model: str) -> None:
        if model.startswith(paths.SCHEME):
            paths.parse_tinker_path(model)  # InvalidTinkerPath: a 400 before any session is touched
            return
        if model not in self.base_models and base_model_name(model) not in self.base_models:
            raise UnknownModel(f"the model {model!r} does not exist: use one of {self.base_models} "
                                     "or a tinker:// sampler weights path")

    async def sampler(self, tenant: str, model: str) -> SamplerRecord:
        """The tenant's sampler for `model`, created on first use (under a per-tenant lock: concurrent
        first requests share one)."""
        self.check_model(model)
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            held = await self._session(tenant)
            record = held.samplers.get(model)
            if record is None:
                req = CreateSamplingSessionRequest(
                    session_id=held.session_id, sampling_session_seq_id=next(self._seq),
                    **({"model_path": model} if model.startswith(paths.SCHEME) else {"base_model": model}))
                sampler_id, _ = await self.sampling.create_session(tenant, req)
                record = held.samplers[model] = await self.sampling.get_owned(tenant, sampler_id)
            return record

    def forget(self, tenant: str, model: str) -> None:
        """The sampler's trainer failed: the next request asks for a new one."""
        held = self._tenants.get(tenant)
        if held is not None:
            held.samplers.pop(model, None)

    async def _session(self, tenant: str) -> _TenantSession:
        held = self._tenants.get(tenant)
        now = time.monotonic()
        if held is not None and now - held.last_heartbeat < self.sessions.idle_timeout / 4:
            return held
        if held is not None:
            try:
                await self.sessions.heartbeat(tenant, held.session_id)
                held.last_heartbeat = now
                return held
            except (SessionGone, UnknownSession):  # reaped while idle: its samplers stopped with it
                pass
        session_id = await self.sessions.create(tenant, CreateSessionRequest(
            tags=[SESSION_TAG], display_name="OpenAI/Anthropic-compatible API"))
        held = self._tenants[tenant] = _TenantSession(session_id, now, {})
        return held
