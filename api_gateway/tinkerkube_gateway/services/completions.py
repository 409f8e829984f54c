"""retrieve_futures: one long-poll per sampling session (and client copy) reporting every sample that
finished since the client's cursor, instead of one retrieve_future long-poll per sample.

The SDK (with `sample_use_retrieve_futures` in the client config) runs one poller per SamplingClient and
waits on it alone, so a completion this endpoint never reports is a sample that hangs: completions are
read from the commit-ordered log `FuturesService` writes when a sample finishes (store/protocol.py), the
cursor is the last serial reported, and a poll trims what the client has seen (`prev_cursor`). The
payload itself is still fetched with retrieve_future.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pydantic import BaseModel, Field

from tinkerkube_gateway.services.futures import EVENTS, FuturesService
from tinkerkube_gateway.services.retention import PRUNE_BATCH
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.store.records import FutureState

EVENT_RETENTION_SECONDS = 3600.0  # completions no poller collected (clients without retrieve_futures)


class FinishedCompletion(BaseModel):
    state: str = "finished"
    request_id: str
    response_payload_uncompressed_size: int | None = None


class FailedCompletion(BaseModel):
    state: str = "failed"
    request_id: str


class CompletionsPage(BaseModel):
    """The SDK's FuturesRetrieveResponse."""

    completions: list[FinishedCompletion | FailedCompletion] = Field(default_factory=list)
    cursor: int


class CompletionsService:
    def __init__(self, futures: FuturesService, sampling: SamplingService):
        self.futures = futures
        self.sampling = sampling

    async def poll(self, tenant: str, sampler_id: str, clone: int, prev_cursor: int,
                   timeout: float | None) -> CompletionsPage:
        """Completions after `prev_cursor`, waiting up to `timeout` (default: the long-poll) for the first."""
        await self.sampling.get_owned(tenant, sampler_id)  # another tenant's sampler is unknown (404)
        repo, notifier = self.futures.repo, self.futures.notifier
        if prev_cursor > 0:
            await repo.trim_future_events(sampler_id, clone, prev_cursor)
        wait = self.futures.long_poll_seconds if timeout is None else min(max(timeout, 0.0),
                                                                           self.futures.long_poll_seconds)
        deadline = time.monotonic() + wait
        while True:
            waiter = notifier.register(EVENTS + sampler_id)  # before the read: no completion slips between
            try:
                events = await repo.future_events(sampler_id, clone, prev_cursor)
                left = deadline - time.monotonic()
                if events or left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await waiter
            finally:
                notifier.unregister(EVENTS + sampler_id, waiter)
        completions: list[FinishedCompletion | FailedCompletion] = [
            FinishedCompletion(request_id=e.request_id, response_payload_uncompressed_size=e.size)
            if e.state == FutureState.COMPLETE else FailedCompletion(request_id=e.request_id) for e in events]
        return CompletionsPage(completions=completions, cursor=events[-1].serial if events else prev_cursor)

    async def sweep(self) -> None:
        await self.futures.repo.drop_future_events_before(time.time() - EVENT_RETENTION_SECONDS, PRUNE_BATCH)
